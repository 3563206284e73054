//! JWT connection tokens (SERVER_API.md section 6): HS256, RS256 and ES256 tokens accepted on `/v1/ws`,
//! every refusal as 1008 `Invalid session`, the `device` claim, 1008 `Token expired` while connected,
//! session tokens alongside, and logs without tokens or the secret. The RSA and EC keys are test-only
//! fixtures (`tests/fixtures/jwt`).

mod common;

use base64::Engine as _;
use chatsync::config::Config;
use chatsync::gateway::auth::sha256_hex;
use chatsync_client::{Client, ConnectOptions, TokenPlacement};
use common::TestServer;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{json, Value};
use std::path::PathBuf;
use std::process::Command;

const SECRET: &str = "test-only-hs256-secret-5b1e-0c9f7a2d";
const INVALID: (u16, &str) = (1008, "Invalid session");

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/jwt").join(name)
}

fn now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs()
}

/// Claims for `sub` valid for an hour.
fn claims(sub: &str) -> Value {
    json!({ "sub": sub, "exp": now() + 3600, "iat": now() })
}

fn sign(alg: Algorithm, key: &EncodingKey, claims: &Value) -> String {
    jsonwebtoken::encode(&Header::new(alg), claims, key).unwrap()
}

fn hs256(claims: &Value) -> String {
    sign(Algorithm::HS256, &EncodingKey::from_secret(SECRET.as_bytes()), claims)
}

fn rs256(claims: &Value) -> String {
    let key = EncodingKey::from_rsa_pem(&std::fs::read(fixture("rsa_private.pem")).unwrap()).unwrap();
    sign(Algorithm::RS256, &key, claims)
}

fn es256(claims: &Value) -> String {
    let key = EncodingKey::from_ec_pem(&std::fs::read(fixture("ec_private.pem")).unwrap()).unwrap();
    sign(Algorithm::ES256, &key, claims)
}

async fn hs_server(tweak: impl FnOnce(&mut Config)) -> TestServer {
    TestServer::start_with(|c| {
        c.jwt_hs256_secret = Some(SECRET.to_owned().into());
        tweak(c);
    })
    .await
}

async fn key_server(pem: &str) -> TestServer {
    TestServer::start_with(|c| c.jwt_public_key_file = Some(fixture(pem))).await
}

fn opts(token: &str, device: &str) -> ConnectOptions {
    ConnectOptions { ignore_warmup_events: true, ..ConnectOptions::new(token, device) }
}

async fn refused(server: &TestServer, token: &str) -> (u16, String) {
    server.refused(&opts(token, "d")).await
}

fn invalid() -> (u16, String) {
    (INVALID.0, INVALID.1.to_owned())
}

#[tokio::test]
async fn hs256_token_connects_and_creates_the_user() {
    let server = hs_server(|_| {}).await;
    assert!(server.ctx.store.user("alice").await.unwrap().is_none());
    let token = hs256(&claims("alice"));
    let (_c, hello) = Client::connect_authenticated(&server.url, &opts(&token, "laptop")).await.unwrap();
    assert_eq!(hello.user_id, "alice");
    assert_eq!(hello.device_hash, sha256_hex("id:laptop"));
    assert!(server.ctx.store.user("alice").await.unwrap().is_some(), "created on first connection");
    assert!(server.ctx.chats.user_key("alice").await.unwrap().is_some(), "with its data key");
    server.ctx.keys.user_key(server.ctx.chats.as_ref(), "alice").await.expect("which opens under the master key");
    let devices = server.ctx.store.devices("alice").await.unwrap();
    assert_eq!(devices.len(), 1);
    // A second connection (the user exists now), as a query parameter.
    let q = ConnectOptions { token_placement: TokenPlacement::Query, ..opts(&token, "phone") };
    let (_c2, hello) = Client::connect_authenticated(&server.url, &q).await.unwrap();
    assert_eq!(hello.user_id, "alice");
}

#[tokio::test]
async fn rs256_token_connects() {
    let server = key_server("rsa_public.pem").await;
    let (_c, hello) = Client::connect_authenticated(&server.url, &opts(&rs256(&claims("bob")), "d")).await.unwrap();
    assert_eq!(hello.user_id, "bob");
}

#[tokio::test]
async fn es256_token_connects() {
    let server = key_server("ec_public.pem").await;
    let (_c, hello) = Client::connect_authenticated(&server.url, &opts(&es256(&claims("carol")), "d")).await.unwrap();
    assert_eq!(hello.user_id, "carol");
}

/// A JWT may be up to 8 KiB (SERVER_API.md section 7), larger than a session token's 1 KiB: claims an issuer
/// adds (and a 4096-bit RSA signature, 683 characters alone) must not lock its users out. One byte more
/// is `Invalid session`.
#[tokio::test]
async fn a_jwt_of_up_to_8_kib_connects_and_a_longer_one_is_invalid_session() {
    let server = hs_server(|_| {}).await;
    let padded = |n: usize| {
        let mut c = claims("alice");
        c["pad"] = json!("p".repeat(n));
        hs256(&c)
    };
    // The longest token of at most 8192 bytes, and the next one (base64url grows by one or two characters).
    let n = (0..8192).take_while(|&n| padded(n + 1).len() <= 8192).last().unwrap() + 1;
    let (longest, over) = (padded(n), padded(n + 1));
    assert!(longest.len() <= 8192 && longest.len() > 8190 && over.len() > 8192, "{} {}", longest.len(), over.len());
    let (_c, hello) = Client::connect_authenticated(&server.url, &opts(&longest, "d")).await.unwrap();
    assert_eq!(hello.user_id, "alice");
    assert_eq!(refused(&server, &over).await, invalid());
}

#[tokio::test]
async fn bad_signature_is_invalid_session() {
    let server = hs_server(|_| {}).await;
    let other = sign(Algorithm::HS256, &EncodingKey::from_secret(b"another-secret"), &claims("alice"));
    assert_eq!(refused(&server, &other).await, invalid());
    // A valid token whose claims were swapped for others.
    let good = hs256(&claims("alice"));
    let forged_claims = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(claims("mallory").to_string());
    let parts: Vec<&str> = good.split('.').collect();
    assert_eq!(refused(&server, &format!("{}.{forged_claims}.{}", parts[0], parts[2])).await, invalid());
    assert!(server.ctx.store.user("mallory").await.unwrap().is_none());
}

#[tokio::test]
async fn alg_none_is_invalid_session() {
    let server = hs_server(|_| {}).await;
    let b64 = |v: Value| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string());
    let header = b64(json!({"alg": "none", "typ": "JWT"}));
    let body = b64(claims("alice"));
    assert_eq!(refused(&server, &format!("{header}.{body}.")).await, invalid());
    assert_eq!(refused(&server, &format!("{header}.{body}.c2ln")).await, invalid());
    assert!(server.ctx.store.user("alice").await.unwrap().is_none());
}

/// Algorithm confusion: an HS256 token whose HMAC key is the server's public key must not verify.
#[tokio::test]
async fn hs256_token_signed_with_the_public_key_is_refused_when_rs256_is_configured() {
    let server = key_server("rsa_public.pem").await;
    let public = std::fs::read(fixture("rsa_public.pem")).unwrap();
    let confused = sign(Algorithm::HS256, &EncodingKey::from_secret(&public), &claims("alice"));
    assert_eq!(refused(&server, &confused).await, invalid());
    // And ES256 with an RSA key configured, RS256 with an EC key configured.
    assert_eq!(refused(&server, &es256(&claims("alice"))).await, invalid());
    let ec = key_server("ec_public.pem").await;
    assert_eq!(refused(&ec, &rs256(&claims("alice"))).await, invalid());
    let public = std::fs::read(fixture("ec_public.pem")).unwrap();
    let confused = sign(Algorithm::HS256, &EncodingKey::from_secret(&public), &claims("alice"));
    assert_eq!(refused(&ec, &confused).await, invalid());
}

#[tokio::test]
async fn expired_and_not_yet_valid_tokens_are_invalid_session() {
    let server = hs_server(|_| {}).await;
    assert_eq!(refused(&server, &hs256(&json!({"sub": "alice", "exp": now() - 10}))).await, invalid());
    let early = json!({"sub": "alice", "exp": now() + 3600, "nbf": now() + 600});
    assert_eq!(refused(&server, &hs256(&early)).await, invalid());
    let future_iat = json!({"sub": "alice", "exp": now() + 3600, "iat": now() + 600});
    assert_eq!(refused(&server, &hs256(&future_iat)).await, invalid());
    // The leeway forgives a little clock skew.
    let lenient = hs_server(|c| c.jwt_leeway_secs = 60).await;
    let (_c, hello) =
        Client::connect_authenticated(&lenient.url, &opts(&hs256(&json!({"sub": "alice", "exp": now() - 10})), "d"))
            .await
            .unwrap();
    assert_eq!(hello.user_id, "alice");
}

/// RFC 7519 section 4.1.4: a token is valid only *before* its `exp` (plus the leeway). One presented in that
/// very second is refused, and creates nothing: it was let in (the user created, the device recorded) and
/// closed at once with `Token expired`. (Whatever the second, the answer with the rule is the same; the
/// wait for the start of a second only makes the connect land in the second the token names.)
#[tokio::test]
async fn a_token_presented_in_the_second_of_its_exp_is_invalid_session_and_creates_nothing() {
    let strict = hs_server(|_| {}).await;
    let lenient = hs_server(|c| c.jwt_leeway_secs = 30).await;
    let this_second = loop {
        let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap();
        if t.subsec_millis() < 300 {
            break t.as_secs();
        }
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    };
    let at_exp = hs256(&json!({"sub": "alice", "exp": this_second}));
    assert_eq!(refused(&strict, &at_exp).await, invalid());
    let at_exp_and_leeway = hs256(&json!({"sub": "alice", "exp": this_second - 30}));
    assert_eq!(refused(&lenient, &at_exp_and_leeway).await, invalid());
    for server in [&strict, &lenient] {
        assert!(server.ctx.store.user("alice").await.unwrap().is_none(), "no user for a refused token");
    }
    // A token whose `exp` is still ahead is taken.
    let (_c, hello) =
        Client::connect_authenticated(&strict.url, &opts(&hs256(&json!({"sub": "bob", "exp": now() + 60})), "d"))
            .await
            .unwrap();
    assert_eq!(hello.user_id, "bob");
}

/// SERVER_API.md section 6: the user of a JWT is created on its first *successful* connection. One refused
/// after authentication (the node at its connection limit) creates no user (it did: the user was created
/// while the token was verified, before the node's limit was checked).
#[tokio::test]
async fn a_jwt_connection_refused_by_the_nodes_limit_creates_no_user() {
    let server = hs_server(|c| c.max_connections = 1).await;
    let bob = server.user_token("bob").await;
    let (first, _) = server.connect(&bob, "d").await;
    assert_eq!(server.refused(&opts(&hs256(&claims("alice")), "d")).await, (1013, "Server overloaded".into()));
    assert!(server.ctx.store.user("alice").await.unwrap().is_none(), "no user for a refused connection");
    assert!(server.ctx.store.devices("alice").await.unwrap().is_empty());
    // Its connection once the node has room creates it (`hs256_token_connects_and_creates_the_user`).
    drop(first);
}

/// RFC 7515 section 4.1.11: a header whose `crit` lists extensions the server does not understand (it
/// understands none) makes the token invalid, though its signature is good; an empty `crit` is malformed.
#[tokio::test]
async fn a_token_with_a_critical_header_extension_is_invalid_session() {
    let server = hs_server(|_| {}).await;
    let key = EncodingKey::from_secret(SECRET.as_bytes());
    for crit in [vec!["x-only-for-audience".to_owned()], vec![]] {
        let header = Header { crit: Some(crit.clone()), ..Header::new(Algorithm::HS256) };
        let token = jsonwebtoken::encode(&header, &claims("alice"), &key).unwrap();
        // (Not `refused`, which would wait for ever on a connection let in.)
        match Client::connect_authenticated(&server.url, &opts(&token, "d")).await.map(|(_, hello)| hello) {
            Err(chatsync_client::ClientError::Closed(close)) => {
                assert_eq!(close, Some((INVALID.0, INVALID.1.to_owned())), "crit {crit:?}")
            }
            other => panic!("crit {crit:?}: {other:?}"),
        }
    }
    assert!(server.ctx.store.user("alice").await.unwrap().is_none());
    // The same token without it connects.
    let (_c, hello) = Client::connect_authenticated(&server.url, &opts(&hs256(&claims("alice")), "d")).await.unwrap();
    assert_eq!(hello.user_id, "alice");
}

#[tokio::test]
async fn missing_or_malformed_claims_are_invalid_session() {
    let server = hs_server(|_| {}).await;
    for bad in [
        json!({"exp": now() + 3600}),
        json!({"sub": "alice"}),
        json!({"sub": "not a valid id!", "exp": now() + 3600}),
        json!({"sub": "", "exp": now() + 3600}),
        json!({"sub": "x".repeat(65), "exp": now() + 3600}),
        json!({"sub": 42, "exp": now() + 3600}),
        json!({"sub": "alice", "exp": "tomorrow"}),
    ] {
        assert_eq!(refused(&server, &hs256(&bad)).await, invalid(), "{bad}");
    }
}

/// RFC 7519 NumericDate may be a non-integer number of seconds; such an `exp`, `nbf` or `iat` is honoured,
/// not refused as malformed.
#[tokio::test]
async fn fractional_numeric_dates_are_accepted_and_honoured() {
    let server = hs_server(|_| {}).await;
    let t = now() as f64;
    let fractional = json!({"sub": "alice", "exp": t + 3600.5, "nbf": t - 0.5, "iat": t - 1.25});
    let (_c, hello) = Client::connect_authenticated(&server.url, &opts(&hs256(&fractional), "d")).await.unwrap();
    assert_eq!(hello.user_id, "alice");
    for bad in [
        json!({"sub": "alice", "exp": t - 10.5}),
        json!({"sub": "alice", "exp": t + 3600.5, "iat": t + 600.5}),
        json!({"sub": "alice", "exp": -1.5}),
    ] {
        assert_eq!(refused(&server, &hs256(&bad)).await, invalid(), "{bad}");
    }
}

#[tokio::test]
async fn audience_and_issuer_are_checked_when_configured() {
    let server = hs_server(|c| {
        c.jwt_audience = Some("chat-app".into());
        c.jwt_issuer = Some("https://login.example".into());
    })
    .await;
    let with = |aud: Option<&str>, iss: Option<&str>| {
        let mut c = claims("alice");
        if let Some(aud) = aud {
            c["aud"] = json!(aud);
        }
        if let Some(iss) = iss {
            c["iss"] = json!(iss);
        }
        hs256(&c)
    };
    let ok = with(Some("chat-app"), Some("https://login.example"));
    Client::connect_authenticated(&server.url, &opts(&ok, "d")).await.unwrap();
    for bad in [
        with(Some("other-app"), Some("https://login.example")),
        with(Some("chat-app"), Some("https://evil.example")),
        with(None, Some("https://login.example")),
        with(Some("chat-app"), None),
    ] {
        assert_eq!(refused(&server, &bad).await, invalid());
    }
    // Without --jwt-audience / --jwt-issuer, neither is checked.
    let open = hs_server(|_| {}).await;
    Client::connect_authenticated(&open.url, &opts(&with(Some("any"), Some("any")), "d")).await.unwrap();
}

#[tokio::test]
async fn device_claim_binds_the_token_to_that_device() {
    let server = hs_server(|_| {}).await;
    let mut c = claims("alice");
    c["device"] = json!("phone-1");
    let token = hs256(&c);
    // The client names the same device, or none (then the claim is its device, not the fingerprint).
    let (_a, hello) = Client::connect_authenticated(&server.url, &opts(&token, "phone-1")).await.unwrap();
    assert_eq!(hello.device_hash, sha256_hex("id:phone-1"));
    let bare = ConnectOptions { device_id: None, ..opts(&token, "") };
    let (_b, hello) = Client::connect_authenticated(&server.url, &bare).await.unwrap();
    assert_eq!(hello.device_hash, sha256_hex("id:phone-1"));
    // Another device: refused.
    assert_eq!(server.refused(&opts(&token, "laptop")).await, (1008, "Device mismatch".into()));
    let q = ConnectOptions { device_id_in_query: true, ..opts(&token, "laptop") };
    assert_eq!(server.refused(&q).await, (1008, "Device mismatch".into()));
    // A malformed device claim is an invalid token.
    let mut c = claims("alice");
    c["device"] = json!("x".repeat(129));
    assert_eq!(refused(&server, &hs256(&c)).await, invalid());
    // Without the claim the connection's own device is used.
    let (_d, hello) = Client::connect_authenticated(&server.url, &opts(&hs256(&claims("alice")), "tab")).await.unwrap();
    assert_eq!(hello.device_hash, sha256_hex("id:tab"));
}

#[tokio::test]
async fn device_mismatch_says_2fa_required_for_a_2fa_user() {
    let server = hs_server(|_| {}).await;
    server.user("alice", true).await;
    let mut c = claims("alice");
    c["device"] = json!("phone-1");
    assert_eq!(server.refused(&opts(&hs256(&c), "laptop")).await, (1008, "Device mismatch, 2FA required".into()));
}

#[tokio::test]
async fn a_connection_is_closed_with_token_expired_when_its_jwt_expires() {
    let server = hs_server(|c| c.session_check_interval_secs = 1).await;
    let short = hs256(&json!({"sub": "alice", "exp": now() + 2}));
    let long = hs256(&claims("alice"));
    let (mut expiring, _) = Client::connect_authenticated(&server.url, &opts(&short, "a")).await.unwrap();
    let (mut lasting, _) = Client::connect_authenticated(&server.url, &opts(&long, "b")).await.unwrap();
    let session = server.user_token("bob").await;
    let (mut session_conn, _) = Client::connect_authenticated(&server.url, &opts(&session, "c")).await.unwrap();
    assert_eq!(expiring.recv_close().await.unwrap(), (1008, "Token expired".into()));
    // The others are still served.
    for c in [&mut lasting, &mut session_conn] {
        let reply = c.request(&chatsync_protocol::ClientMessage::Ping(Default::default())).await.unwrap();
        assert!(matches!(reply.message, chatsync_protocol::ServerMessage::Pong(_)), "{reply:?}");
    }
    // The client reconnects with a fresh token.
    Client::connect_authenticated(&server.url, &opts(&long, "a")).await.unwrap();
}

#[tokio::test]
async fn session_tokens_work_alongside_jwts() {
    let server = hs_server(|_| {}).await;
    let session = server.user_token("alice").await;
    assert!(session.starts_with("cs_") && !session.contains('.'));
    let (_s, hello) = Client::connect_authenticated(&server.url, &opts(&session, "d")).await.unwrap();
    assert_eq!(hello.user_id, "alice");
    let (_j, hello) = Client::connect_authenticated(&server.url, &opts(&hs256(&claims("alice")), "d")).await.unwrap();
    assert_eq!(hello.user_id, "alice");
    assert_eq!(refused(&server, "cs_unknown").await, invalid());
}

#[tokio::test]
async fn without_jwt_configuration_a_jwt_is_an_unknown_session_token() {
    let server = TestServer::start().await;
    assert_eq!(refused(&server, &hs256(&claims("alice"))).await, invalid());
    assert!(server.ctx.store.user("alice").await.unwrap().is_none());
}

#[tokio::test]
async fn unusable_key_configuration_refuses_to_start() {
    let dir = tempfile::tempdir().unwrap();
    let base = || Config { data_dir: dir.path().to_owned(), ..Config::default() };
    let both = Config {
        jwt_hs256_secret: Some(SECRET.to_owned().into()),
        jwt_public_key_file: Some(fixture("rsa_public.pem")),
        ..base()
    };
    let err = chatsync::build(both).await.err().unwrap().to_string();
    assert!(err.contains("exclusive"), "{err}");
    let not_pem = Config { jwt_public_key_file: Some(fixture("README.md")), ..base() };
    let err = format!("{:#}", chatsync::build(not_pem).await.err().unwrap());
    assert!(err.contains("not a PEM RSA or EC"), "{err}");
    let p384 = Config { jwt_public_key_file: Some(fixture("ec384_public.pem")), ..base() };
    let err = format!("{:#}", chatsync::build(p384).await.err().unwrap());
    assert!(err.contains("P-256"), "{err}");
    // A private key (the backend's signing key, by mistake) is not a public key, RSA as EC.
    for private in ["rsa_private.pem", "ec_private.pem"] {
        let config = Config { jwt_public_key_file: Some(fixture(private)), ..base() };
        let err = format!("{:#}", chatsync::build(config).await.err().unwrap());
        assert!(err.contains("not a PEM RSA or EC"), "{private}: {err}");
    }
    // A leeway is for clock skew: one past a day is a mistake, and one past the epoch's age overflowed the
    // library's `now - leeway` (a panic per JWT connection in a debug build, every JWT "expired" in release).
    // HS256 needs a secret of at least 256 bits (RFC 7518 section 3.2): a shorter one can be recovered from
    // any one token by brute force offline, and then a token forged for any user.
    for short in ["hunter2", "", &"s".repeat(31)] {
        let config = Config { jwt_hs256_secret: Some(short.to_owned().into()), ..base() };
        let err = format!("{:#}", chatsync::build(config).await.err().unwrap());
        assert!(err.contains("at least 32 bytes"), "{short:?}: {err}");
        assert!(short.is_empty() || !err.contains(short), "the secret is never printed: {err}");
    }
    let secret = || Some(SECRET.to_owned().into());
    let huge = Config { jwt_hs256_secret: secret(), jwt_leeway_secs: u64::MAX, ..base() };
    let err = format!("{:#}", chatsync::build(huge).await.err().unwrap());
    assert!(err.contains("jwt_leeway_secs"), "{err}");
    let elsewhere = tempfile::tempdir().unwrap();
    let day = Config {
        jwt_hs256_secret: secret(),
        jwt_leeway_secs: 86_400,
        data_dir: elsewhere.path().to_owned(),
        ..Config::default()
    };
    drop(chatsync::build(day).await.unwrap());
    let missing = Config { jwt_public_key_file: Some(fixture("missing.pem")), ..base() };
    let err = format!("{:#}", chatsync::build(missing).await.err().unwrap());
    assert!(err.contains("cannot read"), "{err}");
    let debug = format!("{:?}", Config { jwt_hs256_secret: Some(SECRET.to_owned().into()), ..base() });
    assert!(!debug.contains(SECRET), "the secret never shows in Debug");
}

/// `chatsync serve` with trace logging: neither the tokens (accepted, refused, in the query) nor the
/// secret reach the log; the refusal reason does.
#[tokio::test]
async fn logs_never_contain_jwts_or_the_secret() {
    let dir = tempfile::tempdir().unwrap();
    let (mut child, url, lines) = common::process::spawn_serve(
        common::process::chatsync()
            .arg("--data-dir")
            .arg(dir.path())
            .args(["serve", "--listen", "127.0.0.1:0", "--log-format", "json", "--log-level", "trace"])
            .env("CHATSYNC_JWT_HS256_SECRET", SECRET),
    );
    let reader = std::thread::spawn(move || lines.map_while(Result::ok).collect::<Vec<String>>());
    let good = hs256(&claims("alice"));
    let (c, _) = Client::connect_authenticated(&url, &opts(&good, "d")).await.unwrap();
    c.close().await.unwrap();
    let q = ConnectOptions { token_placement: TokenPlacement::Query, ..opts(&good, "d") };
    let (c, _) = Client::connect_authenticated(&url, &q).await.unwrap();
    c.close().await.unwrap();
    let bad = sign(Algorithm::HS256, &EncodingKey::from_secret(b"wrong"), &claims("alice"));
    let mut rejected = Client::connect(&url, &opts(&bad, "d")).await.unwrap();
    assert_eq!(rejected.recv_close().await.unwrap(), invalid());
    Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap();
    assert!(child.wait().unwrap().success());
    let logs = reader.join().unwrap().join("\n");
    assert!(logs.contains("bad signature"), "the reason is logged: {}", &logs[..logs.len().min(3000)]);
    for (name, secret) in [("token", good.as_str()), ("refused token", bad.as_str()), ("secret", SECRET)] {
        assert!(!logs.contains(secret), "the {name} reached the log");
        for part in secret.split('.').skip(1).filter(|p| p.len() > 16) {
            assert!(!logs.contains(part), "part of the {name} reached the log");
        }
    }
}

/// `chatsync serve` stops at once with a clear message when the JWT configuration is unusable.
#[test]
fn serve_refuses_to_start_with_an_unusable_jwt_configuration() {
    let dir = tempfile::tempdir().unwrap();
    let serve = |args: &[&str], env: &[(&str, &str)]| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_chatsync"));
        cmd.arg("--data-dir").arg(dir.path()).args(["serve", "--listen", "127.0.0.1:0"]).args(args);
        cmd.env_remove("CHATSYNC_CONFIG").env_remove("RUST_LOG");
        for (k, v) in env {
            cmd.env(k, v);
        }
        let out = cmd.output().unwrap();
        assert!(!out.status.success());
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let readme = fixture("README.md");
    let err = serve(&["--jwt-public-key-file", readme.to_str().unwrap()], &[]);
    assert!(err.contains("not a PEM RSA or EC"), "{err}");
    let rsa = fixture("rsa_public.pem");
    let err = serve(&["--jwt-public-key-file", rsa.to_str().unwrap()], &[("CHATSYNC_JWT_HS256_SECRET", SECRET)]);
    assert!(err.contains("jwt-hs256-secret") || err.contains("exclusive"), "{err}");
    assert!(!err.contains(SECRET), "the secret is never printed: {err}");
}

/// A JWT valid when it was verified but expired before its connection was admitted (held between its
/// authentication and its registration: a slow store, a cluster node waiting for its subscription) is
/// refused like any expired token, 1008 `Invalid session`, before anything is created: it was let in (the
/// user created, the device recorded, `connected` sent) and closed at once with `Token expired`.
#[tokio::test]
async fn a_jwt_that_expires_before_its_connection_is_admitted_is_invalid_session_and_creates_nothing() {
    let server = hs_server(|_| {}).await;
    let exp = now() + 2;
    let token = hs256(&json!({"sub": "alice", "exp": exp}));
    let mut held = server.ctx.pauses.arm(chatsync::pause::AUTHENTICATED);
    let mut client = Client::connect(&server.url, &opts(&token, "d")).await.unwrap();
    held.reached().await;
    // Past `exp` (RFC 7519: valid only before it) by the wall clock the server reads.
    while chatsync::store::now_millis() < (exp as i64 + 1) * 1000 {
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    held.release();
    match client.recv().await {
        Err(chatsync_client::ClientError::Closed(close)) => assert_eq!(close, Some(invalid())),
        other => panic!("a connection whose token expired before its admission was let in: {other:?}"),
    }
    assert!(server.ctx.store.user("alice").await.unwrap().is_none(), "no user for a refused token");
    assert!(server.ctx.store.devices("alice").await.unwrap().is_empty(), "no device for a refused token");
}

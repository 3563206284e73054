//! The web demo over real HTTP: `/` serves the page, `/app.js`, `/style.css` and `/sdk/chatsync.js` (the
//! very file of `clients/typescript`) its parts, with their content types and a strict CSP; the
//! `no_web_demo` setting (`--no-web-demo`, `CHATSYNC_NO_WEB_DEMO`) leaves every one of them out while
//! `/v1/ws` keeps working; unknown paths are 404.

#[macro_use]
mod sync_util;
mod common;

use common::process::{chatsync, drain, spawn_serve};
use common::{http, TestServer};
use sync_util::*;

fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
}

fn host(url: &str) -> String {
    url.trim_start_matches("ws://").trim_end_matches("/v1/ws").to_owned()
}

const SDK: &str = include_str!("../../../clients/typescript/src/index.js");

#[tokio::test]
async fn the_page_and_the_sdk_are_served() {
    let server = TestServer::start().await;
    let addr = host(&server.url);

    let (status, headers, body) = http(&addr, "GET", "/").await;
    assert_eq!(status, 200);
    assert_eq!(header(&headers, "content-type"), Some("text/html; charset=utf-8"));
    assert!(body.contains("<title>chatsync demo</title>"), "{body}");
    assert!(body.contains(r#"<script type="module" src="/app.js">"#));
    let csp = header(&headers, "content-security-policy").unwrap();
    assert!(csp.contains("script-src 'self'") && csp.contains("connect-src 'self'"), "{csp}");
    assert!(csp.contains("frame-ancestors 'none'"));
    assert_eq!(header(&headers, "x-content-type-options"), Some("nosniff"));
    assert_eq!(header(&headers, "referrer-policy"), Some("no-referrer"));

    let (status, headers, body) = http(&addr, "GET", "/app.js").await;
    assert_eq!(status, 200);
    assert_eq!(header(&headers, "content-type"), Some("text/javascript; charset=utf-8"));
    assert!(body.contains("from '/sdk/chatsync.js'"), "the page uses the SDK");

    let (status, headers, body) = http(&addr, "GET", "/sdk/chatsync.js").await;
    assert_eq!(status, 200);
    assert_eq!(header(&headers, "content-type"), Some("text/javascript; charset=utf-8"));
    assert_eq!(body, SDK, "the SDK file itself, not a copy");

    let (status, headers, _) = http(&addr, "GET", "/style.css").await;
    assert_eq!((status, header(&headers, "content-type")), (200, Some("text/css; charset=utf-8")));
    assert_eq!(http(&addr, "GET", "/sdk/chatsync.d.ts").await.0, 200);

    let (status, headers, body) = http(&addr, "HEAD", "/").await;
    assert_eq!(status, 200);
    assert!(body.is_empty());
    assert_eq!(header(&headers, "content-type"), Some("text/html; charset=utf-8"));

    assert_eq!(http(&addr, "GET", "/nope").await.0, 404);
    assert_eq!(http(&addr, "GET", "/sdk/").await.0, 404);
    assert_eq!(http(&addr, "POST", "/").await.0, 405);
}

#[tokio::test]
async fn no_web_demo_leaves_every_demo_route_out_and_the_socket_works() {
    let server = TestServer::start_with(|c| c.no_web_demo = true).await;
    let addr = host(&server.url);
    for path in ["/", "/app.js", "/style.css", "/sdk/chatsync.js", "/sdk/chatsync.d.ts"] {
        assert_eq!(http(&addr, "GET", path).await.0, 404, "{path}");
    }
    let mut alice = new_user(&server, "alice", "laptop").await;
    alice.send(&ping(), Some("p")).await.unwrap();
    expect_msg!(alice.recv().await.unwrap(), Pong);
}

/// The flag, the environment variable and the TOML key of the real binary.
#[test]
fn the_flag_the_env_variable_and_the_config_key_turn_the_demo_off() {
    let config = tempfile::tempdir().unwrap();
    let toml = config.path().join("chatsync.toml");
    std::fs::write(&toml, "no_web_demo = true\n").unwrap();
    let toml = toml.to_str().unwrap();
    let cases: [(&[&str], Option<&str>, u16); 6] = [
        (&[], None, 200),
        (&["--no-web-demo"], None, 404),
        (&[], Some("1"), 404),
        (&["--no-web-demo=false"], Some("true"), 200),
        (&["--config", toml], None, 404),
        (&["--config", toml, "--no-web-demo=false"], None, 200),
    ];
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    for (flags, env, expected) in cases {
        let data = tempfile::tempdir().unwrap();
        let mut cmd = chatsync();
        cmd.env_remove("CHATSYNC_NO_WEB_DEMO")
            .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
            .arg(data.path())
            .args(flags);
        if let Some(v) = env {
            cmd.env("CHATSYNC_NO_WEB_DEMO", v);
        }
        let (mut child, url, lines) = spawn_serve(&mut cmd);
        drain(lines);
        let status = runtime.block_on(http(&host(&url), "GET", "/")).0;
        child.kill().unwrap();
        child.wait().unwrap();
        assert_eq!(status, expected, "flags {flags:?}, CHATSYNC_NO_WEB_DEMO={env:?}");
    }
}

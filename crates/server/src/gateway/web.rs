//! The web demo (issue 10): a small chat page at `/` that signs in with a session token and syncs through
//! `/v1/ws` with the TypeScript SDK, which it loads from `/sdk/chatsync.js`. The files are embedded in
//! the binary at compile time (the page from `crates/server/web/`, the SDK from `clients/typescript/src/`,
//! its one source), so a deployment serves exactly what was tested. `--no-web-demo` leaves these routes
//! out. The page holds no secret: the token is pasted by the user and kept in the tab's
//! `sessionStorage`; it reaches the server as the `token` query parameter of the upgrade (PROTOCOL.md §2).

use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;

/// One embedded file: its URL path, content type and bytes.
struct Asset {
    path: &'static str,
    content_type: &'static str,
    body: &'static str,
}

/// Every file of the demo.
const ASSETS: &[Asset] = &[
    Asset { path: "/", content_type: "text/html; charset=utf-8", body: include_str!("../../web/index.html") },
    Asset { path: "/app.js", content_type: "text/javascript; charset=utf-8", body: include_str!("../../web/app.js") },
    Asset { path: "/style.css", content_type: "text/css; charset=utf-8", body: include_str!("../../web/style.css") },
    Asset {
        path: "/sdk/chatsync.js",
        content_type: "text/javascript; charset=utf-8",
        body: include_str!("../../../../clients/typescript/src/index.js"),
    },
    Asset {
        path: "/sdk/chatsync.d.ts",
        content_type: "text/plain; charset=utf-8",
        body: include_str!("../../../../clients/typescript/src/index.d.ts"),
    },
];

/// The page may load scripts and styles from this origin only and open sockets to it only; it is never
/// framed and sends no referrer.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
                   connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

/// The routes of the demo (every path of [`ASSETS`], `GET` and `HEAD`).
pub fn router<S: Clone + Send + Sync + 'static>() -> Router<S> {
    ASSETS.iter().fold(Router::new(), |router, asset| {
        router.route(
            asset.path,
            get(move || async move {
                (
                    [
                        (header::CONTENT_TYPE, asset.content_type),
                        (header::CACHE_CONTROL, "no-cache"),
                        (header::CONTENT_SECURITY_POLICY, CSP),
                        (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
                        (header::REFERRER_POLICY, "no-referrer"),
                        (header::X_FRAME_OPTIONS, "DENY"),
                    ],
                    asset.body,
                )
                    .into_response()
            }),
        )
    })
}

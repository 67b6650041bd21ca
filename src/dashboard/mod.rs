//! The dashboard: a web page (our own HTML/CSS/JS, served from the binary), its JSON
//! API under `/api/`, live updates over SSE and `/metrics`.
//!
//! Every answer comes from the coordinator API the CLI uses: over NATS in distributed
//! mode (any coordinator answers for every run: a request about a run hosted elsewhere
//! is passed on to its owner), or from the in-process coordinator of an embedded run.

use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::HeaderMap;
use axum::http::{header, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures_util::Stream;
use serde::Deserialize;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use pinazu_coordinator::Coordinator;
use pinazu_shared::api::{ApiReply, ApiRequest, CallStatus, CallsQuery, RunsQuery};
use pinazu_shared::events::FlowStatus;
use pinazu_shared::ids::FlowRunId;
use pinazu_shared::subjects::Subjects;

const PAGE: &str = include_str!("page.html");
const SCRIPT: &str = include_str!("app.js");
const STYLE: &str = include_str!("style.css");

/// Where the dashboard's answers come from.
#[derive(Clone)]
pub enum Backend {
    /// The coordinators' API over NATS; `coordinator` is this process's (its metrics).
    Nats {
        /// The connection.
        client: async_nats::Client,
        /// Subjects under the prefix.
        subjects: Subjects,
        /// This process's coordinator.
        coordinator: Coordinator,
    },
    /// The in-process coordinator of an embedded run.
    Local(Coordinator),
}

impl Backend {
    fn coordinator(&self) -> &Coordinator {
        match self {
            Backend::Nats { coordinator, .. } | Backend::Local(coordinator) => coordinator,
        }
    }

    /// Answers one API request.
    async fn ask(&self, req: ApiRequest) -> ApiReply {
        match self {
            Backend::Nats {
                client, subjects, ..
            } => {
                let wait = if matches!(req, ApiRequest::Cancel { .. }) {
                    Duration::from_secs(12)
                } else {
                    Duration::ZERO
                };
                crate::distributed::request_waiting(client, subjects, req.verb(), &req, wait)
                    .await
                    .unwrap_or_else(ApiReply::Error)
            }
            Backend::Local(c) => local_answer(c, req).await,
        }
    }
}

/// The embedded run's coordinator answers what it knows.
async fn local_answer(c: &Coordinator, req: ApiRequest) -> ApiReply {
    let unknown = |id: FlowRunId| ApiReply::Unknown(format!("flow run {id} is not known here"));
    match req {
        ApiRequest::Status { flow_run_id } => c
            .run_info(flow_run_id)
            .map_or_else(|| unknown(flow_run_id), ApiReply::Run),
        ApiRequest::Runs => ApiReply::Runs(c.runs()),
        ApiRequest::History(q) => {
            let now_ms = pinazu_shared::events::now_ms();
            let mut runs: Vec<_> = c
                .runs()
                .into_iter()
                // (when it started; the embedded coordinator keeps no end time)
                .map(|r| pinazu_shared::api::RunInfo {
                    at_ms: r.at_ms.or(Some(now_ms.saturating_sub(r.wall_ms))),
                    ..r
                })
                .filter(|r| q.admits(r, r.at_ms.unwrap_or(0)))
                .collect();
            runs.sort_by_key(|r| std::cmp::Reverse(r.at_ms));
            runs.truncate(q.limit.max(1) as usize);
            ApiReply::Runs(runs)
        }
        ApiRequest::Cancel { flow_run_id } => {
            match c.cancel(flow_run_id, "the run was cancelled by an operator") {
                Ok(()) => {
                    let _ =
                        tokio::time::timeout(Duration::from_secs(10), c.wait(flow_run_id)).await;
                    c.run_info(flow_run_id)
                        .map_or_else(|| unknown(flow_run_id), ApiReply::Run)
                }
                Err(e) => ApiReply::Error(e),
            }
        }
        ApiRequest::Agents => ApiReply::Agents(c.agents().await),
        ApiRequest::Calls { flow_run_id, query } => match c.calls(flow_run_id, &query).await {
            Ok(Some(page)) => ApiReply::Calls(Box::new(page)),
            Ok(None) => unknown(flow_run_id),
            Err(e) => ApiReply::Error(e),
        },
        other => ApiReply::Error(format!(
            "`{}` is not served by an embedded run",
            other.verb()
        )),
    }
}

/// The router: the page, the API, SSE and `/metrics`.
pub fn router(backend: Backend) -> Router {
    Router::new()
        .route(
            "/",
            get(|| async { asset(PAGE, "text/html; charset=utf-8") }),
        )
        .route(
            "/app.js",
            get(|| async { asset(SCRIPT, "text/javascript; charset=utf-8") }),
        )
        .route(
            "/style.css",
            get(|| async { asset(STYLE, "text/css; charset=utf-8") }),
        )
        .route("/api/runs", get(runs))
        .route("/api/runs/{id}", get(run))
        .route("/api/runs/{id}/calls", get(calls))
        .route("/api/runs/{id}/cancel", post(cancel))
        .route("/api/runs/{id}/live", get(live))
        .route("/api/agents", get(agents))
        .route("/metrics", get(metrics))
        .with_state(Arc::new(backend))
}

/// Serves the dashboard on `addr` until the process ends. Returns the address bound
/// (port 0 picks one).
pub async fn serve(addr: SocketAddr, backend: Backend) -> std::io::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    serve_on(listener, backend)
}

/// Serves the dashboard on a socket bound already (bound early, so that a taken
/// address is known before anything starts). Returns its address.
pub fn serve_on(
    listener: tokio::net::TcpListener,
    backend: Backend,
) -> std::io::Result<SocketAddr> {
    let bound = listener.local_addr()?;
    let app = router(backend);
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!(error = %e, "the dashboard stopped serving");
        }
    });
    Ok(bound)
}

/// Serves an agent's `/metrics` on a socket bound already. Returns its address.
pub fn serve_metrics(
    listener: tokio::net::TcpListener,
    metrics: Arc<pinazu_agent::metrics::AgentMetrics>,
) -> std::io::Result<SocketAddr> {
    let bound = listener.local_addr()?;
    let app = Router::new().route(
        "/metrics",
        get(move || {
            let m = metrics.clone();
            async move { ([(header::CONTENT_TYPE, OPENMETRICS)], m.render()) }
        }),
    );
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!(error = %e, "the agent's metrics stopped being served");
        }
    });
    Ok(bound)
}

const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

fn asset(body: &'static str, kind: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, kind),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
        .into_response()
}

type Shared = State<Arc<Backend>>;

/// An API failure as JSON `{"error": ...}` with a fitting status.
fn failure(status: StatusCode, msg: impl Into<String>) -> Response {
    (status, Json(serde_json::json!({ "error": msg.into() }))).into_response()
}

fn reply_to_response(reply: ApiReply) -> Response {
    match reply {
        ApiReply::Run(r) => Json(r).into_response(),
        ApiReply::Runs(r) => Json(r).into_response(),
        ApiReply::Agents(a) => Json(a).into_response(),
        ApiReply::Calls(p) => Json(p).into_response(),
        ApiReply::Unknown(e) => failure(StatusCode::NOT_FOUND, e),
        ApiReply::Error(e) => failure(StatusCode::BAD_GATEWAY, e),
        other => failure(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("unexpected answer: {other:?}"),
        ),
    }
}

/// A request the dashboard cannot take (answered 400, saying why).
struct BadRequest(String);

impl IntoResponse for BadRequest {
    fn into_response(self) -> Response {
        failure(StatusCode::BAD_REQUEST, self.0)
    }
}

fn run_id(raw: &str) -> Result<FlowRunId, BadRequest> {
    FlowRunId::parse(raw, "run id").map_err(|e| BadRequest(e.to_string()))
}

#[derive(Deserialize)]
struct RunsParams {
    status: Option<String>,
    flow: Option<String>,
    since_ms: Option<u64>,
    before_ms: Option<u64>,
    limit: Option<u32>,
}

async fn runs(State(b): Shared, p: Result<Query<RunsParams>, QueryRejection>) -> Response {
    let p = match p {
        Ok(Query(p)) => p,
        Err(e) => return BadRequest(e.body_text()).into_response(),
    };
    let status = match p.status.as_deref().filter(|s| !s.is_empty()) {
        None => None,
        Some(s) => match s.to_ascii_uppercase().as_str() {
            "RUNNING" => Some(FlowStatus::Running),
            "SUCCESS" => Some(FlowStatus::Success),
            "FAILED" => Some(FlowStatus::Failed),
            _ => {
                return failure(
                    StatusCode::BAD_REQUEST,
                    format!("status {s:?}: give RUNNING, SUCCESS or FAILED"),
                )
            }
        },
    };
    let q = RunsQuery {
        limit: p.limit.unwrap_or(50).clamp(1, 1000),
        status,
        flow: p.flow.filter(|f| !f.is_empty()),
        since_ms: p.since_ms,
        before_ms: p.before_ms,
    };
    reply_to_response(b.ask(ApiRequest::History(q)).await)
}

async fn run(State(b): Shared, Path(id): Path<String>) -> Response {
    match run_id(&id) {
        Ok(flow_run_id) => reply_to_response(b.ask(ApiRequest::Status { flow_run_id }).await),
        Err(r) => r.into_response(),
    }
}

#[derive(Deserialize)]
struct CallsParams {
    offset: Option<u64>,
    limit: Option<u32>,
    status: Option<String>,
    task: Option<String>,
    width: Option<u32>,
    logged: Option<bool>,
    with_logs: Option<bool>,
}

fn calls_query(p: CallsParams) -> Result<CallsQuery, BadRequest> {
    let status = match p.status.as_deref().filter(|s| !s.is_empty()) {
        None => None,
        Some(s) => Some(CallStatus::parse(s).ok_or_else(|| {
            BadRequest(format!(
                "status {s:?}: give PENDING, RUNNING, RETRYING, SUCCESS, FAILED or CANCELLED"
            ))
        })?),
    };
    Ok(CallsQuery {
        offset: p.offset.unwrap_or(0),
        limit: p.limit.unwrap_or(100),
        status,
        task: p.task.filter(|t| !t.is_empty()),
        timeline_width: p.width.unwrap_or(0),
        logged: p.logged.unwrap_or(false),
        with_logs: p.with_logs.unwrap_or(false),
    })
}

async fn calls(
    State(b): Shared,
    Path(id): Path<String>,
    p: Result<Query<CallsParams>, QueryRejection>,
) -> Response {
    let p = match p {
        Ok(Query(p)) => p,
        Err(e) => return BadRequest(e.body_text()).into_response(),
    };
    let (flow_run_id, query) = match (run_id(&id), calls_query(p)) {
        (Ok(id), Ok(q)) => (id, q),
        (Err(r), _) | (_, Err(r)) => return r.into_response(),
    };
    reply_to_response(b.ask(ApiRequest::Calls { flow_run_id, query }).await)
}

/// `POST /api/runs/RUN/cancel`, with the header `x-pinazu: cancel` (the page sends it;
/// a form or a link on another site cannot, so no other page can cancel runs through a
/// browser that has the dashboard open).
async fn cancel(State(b): Shared, Path(id): Path<String>, headers: HeaderMap) -> Response {
    if headers.get("x-pinazu").and_then(|v| v.to_str().ok()) != Some("cancel") {
        return failure(
            StatusCode::FORBIDDEN,
            "a cancel needs the header `x-pinazu: cancel` (curl -X POST -H 'x-pinazu: cancel' ...)",
        );
    }
    match run_id(&id) {
        Ok(flow_run_id) => match b.ask(ApiRequest::Cancel { flow_run_id }).await {
            ApiReply::Error(e) if e.contains("has already ended") => {
                failure(StatusCode::CONFLICT, e)
            }
            ApiReply::Error(e) if e.contains("not known") || e.contains("unknown") => {
                failure(StatusCode::NOT_FOUND, e)
            }
            reply => reply_to_response(reply),
        },
        Err(r) => r.into_response(),
    }
}

async fn agents(State(b): Shared) -> Response {
    reply_to_response(b.ask(ApiRequest::Agents).await)
}

async fn metrics(State(b): Shared) -> Response {
    (
        [(header::CONTENT_TYPE, OPENMETRICS)],
        b.coordinator().render_metrics().await,
    )
        .into_response()
}

/// A run's state once a second (`run` events: its `RunInfo` and the task table's
/// version and counts, no rows): the page asks for the rows it shows when the version
/// moved. Ends after the run has ended.
async fn live(
    State(b): Shared,
    Path(id): Path<String>,
) -> Result<Sse<impl Stream<Item = Result<Event, std::convert::Infallible>>>, BadRequest> {
    let flow_run_id = run_id(&id)?;
    let stream = futures_util::stream::unfold((b, 0u64, false), move |(b, n, done)| async move {
        if done {
            return None;
        }
        if n > 0 {
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        let info = b.ask(ApiRequest::Status { flow_run_id }).await;
        let page = b
            .ask(ApiRequest::Calls {
                flow_run_id,
                query: CallsQuery {
                    limit: 1,
                    offset: u64::MAX,
                    ..Default::default()
                },
            })
            .await;
        // (ends once the run ended, or is not known at all)
        let ended = matches!(&info, ApiReply::Run(r) if r.status != FlowStatus::Running)
            || matches!(&info, ApiReply::Unknown(_));
        let body = serde_json::json!({
            "run": match &info { ApiReply::Run(r) => serde_json::to_value(r).ok(), _ => None },
            "error": match &info { ApiReply::Error(e) | ApiReply::Unknown(e) => Some(e.clone()), _ => None },
            "table": match &page { ApiReply::Calls(p) => serde_json::to_value(p).ok(), _ => None },
        });
        let event = Event::default().event("run").data(body.to_string());
        Some((Ok(event), (b, n + 1, ended)))
    });
    Ok(Sse::new(stream).keep_alive(KeepAlive::default()))
}

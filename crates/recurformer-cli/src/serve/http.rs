//! Routes, request handling and streaming: the HTTP side of `serve`.
//!
//! Everything a client can send is answered with a status and an OpenAI-shaped error body, and
//! everything that can be refused is refused before a stream starts (a prompt over the context,
//! a full queue), so a 200 stream always carries an answer.

use super::api::{parse_request, ApiError, CompletionRequest, Endpoint, Envelope, Input};
use super::engine::{EngineHandle, Event, Job, SubmitError};
use super::metrics::Metrics;
use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use recurformer::checkpoint::loader::LoadedModel;
use recurformer::model::generate::{end_tokens, SamplingParams};
use serde_json::{json, Value};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Instant;
use tokio::sync::mpsc::UnboundedReceiver;

/// The loaded model and the engine running it.
pub struct Ready {
    pub loaded: Arc<LoadedModel>,
    pub engine: EngineHandle,
}

/// What every handler shares. `ready` is empty while the model loads.
pub struct Shared {
    pub model_id: String,
    pub api_key: Option<String>,
    pub max_body_bytes: usize,
    pub metrics: Arc<Metrics>,
    pub ready: OnceLock<Ready>,
    pub started: u64,
}

pub type AppState = Arc<Shared>;

pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/v1/chat/completions", post(chat))
        .route("/v1/completions", post(completions))
        .route("/v1/models", get(models))
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(axum::middleware::from_fn_with_state(state.clone(), auth))
        .with_state(state)
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// A process-unique request id.
fn request_id(prefix: &str) -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    format!(
        "{prefix}-{:x}{:06x}",
        unix_now(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// A seed for requests that give none, different for every request.
fn fresh_seed() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(unix_now());
    h.finish()
}

fn loading() -> ApiError {
    ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "unavailable_error",
        "model_loading",
        "the model is still loading; retry when GET /health answers 200".into(),
    )
}

fn internal(msg: String) -> ApiError {
    ApiError::new(
        StatusCode::INTERNAL_SERVER_ERROR,
        "server_error",
        "internal_error",
        msg,
    )
}

/// Constant-time comparison, so the time of a refusal does not tell how much of a key matched.
fn same_key(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

async fn auth(State(s): State<AppState>, req: Request, next: Next) -> Response {
    if let Some(key) = &s.api_key {
        // /health stays open so that a load balancer can probe without the key.
        if req.uri().path() != "/health" {
            let given = req
                .headers()
                .get(header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.strip_prefix("Bearer "));
            let err = match given {
                None => Some("missing API key: send 'Authorization: Bearer <key>'"),
                Some(k) if !same_key(k.trim(), key) => Some("incorrect API key provided"),
                Some(_) => None,
            };
            if let Some(msg) = err {
                s.metrics.requests_invalid.inc();
                return ApiError::new(
                    StatusCode::UNAUTHORIZED,
                    "invalid_request_error",
                    "invalid_api_key",
                    msg.into(),
                )
                .into_response();
            }
        }
    }
    next.run(req).await
}

async fn not_found(State(s): State<AppState>, req: Request) -> Response {
    s.metrics.requests_invalid.inc();
    ApiError::new(
        StatusCode::NOT_FOUND,
        "invalid_request_error",
        "unknown_url",
        format!(
            "unknown route {} {}: this server answers POST /v1/chat/completions, POST \
             /v1/completions, GET /v1/models, GET /health and GET /metrics",
            req.method(),
            req.uri().path()
        ),
    )
    .into_response()
}

async fn method_not_allowed(State(s): State<AppState>, req: Request) -> Response {
    s.metrics.requests_invalid.inc();
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "invalid_request_error",
        "method_not_allowed",
        format!("{} is not allowed on {}", req.method(), req.uri().path()),
    )
    .into_response()
}

async fn health(State(s): State<AppState>) -> Response {
    match s.ready.get() {
        Some(_) => Json(json!({"status": "ok"})).into_response(),
        None => loading().into_response(),
    }
}

async fn metrics(State(s): State<AppState>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        s.metrics.render(),
    )
        .into_response()
}

async fn models(State(s): State<AppState>) -> Response {
    let mut entry = json!({
        "id": s.model_id,
        "object": "model",
        "created": s.started,
        "owned_by": "recurformer",
    });
    if let Some(r) = s.ready.get() {
        let l = &r.engine.limits;
        let m = &r.loaded.model;
        entry["meta"] = json!({
            "context_length": l.context,
            "recurformer": m.recurformer.is_some(),
            "kv_cache_bytes_per_token": l.kv_bytes_per_token,
            "kv_cache_dtype": m.kv_dtype.name(),
            "recurrent_state_bytes": l.state_bytes,
            "parallel": l.parallel,
        });
    }
    Json(json!({"object": "list", "data": [entry]})).into_response()
}

async fn chat(State(s): State<AppState>, req: Request) -> Response {
    respond(&s, complete(&s, req, Endpoint::Chat).await)
}

async fn completions(State(s): State<AppState>, req: Request) -> Response {
    respond(&s, complete(&s, req, Endpoint::Completion).await)
}

fn respond(s: &Shared, r: Result<Response, ApiError>) -> Response {
    r.unwrap_or_else(|e| {
        if e.status.is_client_error() {
            s.metrics.requests_invalid.inc();
        }
        e.into_response()
    })
}

fn check_json(headers: &HeaderMap) -> Result<(), ApiError> {
    let ct = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let mime = ct.split(';').next().unwrap_or("").trim();
    if mime.eq_ignore_ascii_case("application/json") {
        return Ok(());
    }
    Err(ApiError::new(
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        "invalid_request_error",
        "unsupported_media_type",
        if ct.is_empty() {
            "the request has no Content-Type; send 'Content-Type: application/json'".into()
        } else {
            format!("Content-Type is '{ct}'; send 'Content-Type: application/json'")
        },
    ))
}

/// Bodies over the limit are still read (and dropped) up to this size before the 413.
const DRAIN_LIMIT: usize = 64 << 20;

async fn read_body(req: Request, limit: usize) -> Result<Bytes, ApiError> {
    let too_big = |n: Option<usize>| {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "invalid_request_error",
            "request_too_large",
            match n {
                Some(n) => format!("the request body has {n} bytes; the limit is {limit}"),
                None => format!("the request body is over the limit of {limit} bytes"),
            },
        )
    };
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if let Some(n) = declared.filter(|&n| n > limit) {
        // Read and discard a moderately large body so that a client that writes all of it
        // before reading the answer (most do) sees the 413 rather than a reset connection.
        if n <= DRAIN_LIMIT {
            let mut body = req.into_body();
            while let Some(Ok(_)) = http_body_util::BodyExt::frame(&mut body).await {}
        }
        return Err(too_big(Some(n)));
    }
    axum::body::to_bytes(req.into_body(), limit)
        .await
        .map_err(|e| {
            let inner = e.into_inner();
            if inner
                .downcast_ref::<http_body_util::LengthLimitError>()
                .is_some()
            {
                too_big(None)
            } else {
                ApiError::new(
                    StatusCode::BAD_REQUEST,
                    "invalid_request_error",
                    "invalid_body",
                    format!("reading the request body: {inner}"),
                )
            }
        })
}

/// Prompt tokens and the tokens that end the answer.
fn tokenize(loaded: &LoadedModel, input: &Input) -> Result<(Vec<u32>, Vec<u32>), ApiError> {
    let tok = loaded.tokenizer().map_err(|e| internal(format!("{e:#}")))?;
    let eos = &loaded.model.cfg.eos_token_ids;
    match input {
        Input::Messages(msgs) => {
            let text = tok
                .apply_chat_template(msgs, true)
                .map_err(|e| ApiError::invalid("messages", format!("{e:#}")))?;
            // The template writes any BOS itself.
            let ids = tok
                .encode(&text, false)
                .map_err(|e| ApiError::invalid("messages", format!("{e:#}")))?;
            Ok((ids, end_tokens(eos, tok, true)))
        }
        Input::Text(text) => {
            let ids = tok
                .encode(text, true)
                .map_err(|e| ApiError::invalid("prompt", format!("{e:#}")))?;
            Ok((ids, end_tokens(eos, tok, false)))
        }
        Input::Tokens(ids) => {
            let v = loaded.model.cfg.vocab_size;
            if let Some(bad) = ids.iter().find(|&&t| t as usize >= v) {
                return Err(ApiError::invalid(
                    "prompt",
                    format!("token id {bad} is outside the vocabulary of {v}"),
                ));
            }
            Ok((ids.clone(), end_tokens(eos, tok, false)))
        }
    }
}

async fn complete(s: &Shared, req: Request, endpoint: Endpoint) -> Result<Response, ApiError> {
    s.metrics.requests_received.inc();
    let arrived = Instant::now();
    check_json(req.headers())?;
    let body = read_body(req, s.max_body_bytes).await?;
    let r: CompletionRequest = parse_request(&body, endpoint, &s.model_id)?;
    let ready = s.ready.get().ok_or_else(loading)?;
    let loaded = ready.loaded.clone();
    let input = r.input.clone();
    // Tokenising a long prompt takes milliseconds: off the thread that serves the sockets.
    let (prompt, end) = tokio::task::spawn_blocking(move || tokenize(&loaded, &input))
        .await
        .map_err(|e| internal(format!("tokenising: {e}")))??;
    let ctx = ready.engine.limits.context;
    let n = prompt.len();
    if n == 0 {
        return Err(ApiError::invalid(
            endpoint_field(endpoint),
            "the prompt is empty: nothing to condition on".into(),
        ));
    }
    let too_long = |what: String| {
        ApiError::invalid(endpoint_field(endpoint), what).with_code("context_length_exceeded")
    };
    if n >= ctx {
        return Err(too_long(format!(
            "This model's maximum context length is {ctx} tokens. However, your prompt has \
             {n} tokens, leaving no room for an answer."
        )));
    }
    let max_tokens = match r.max_tokens {
        Some(m) if n + m > ctx => {
            return Err(too_long(format!(
                "This model's maximum context length is {ctx} tokens. However, you requested \
                 {} tokens ({n} in the prompt, {m} for the completion).",
                n + m
            )))
        }
        Some(m) => m,
        None => ctx - n,
    };
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let job = Job {
        prompt,
        max_tokens,
        sampling: SamplingParams {
            temperature: r.temperature,
            top_k: r.top_k,
            top_p: r.top_p,
            repetition_penalty: r.repetition_penalty,
            seed: r.seed.unwrap_or_else(fresh_seed),
        },
        stop: r.stop.clone(),
        end_tokens: end,
        arrived,
        events: tx,
    };
    ready.engine.submit(job).map_err(|e| match e {
        SubmitError::QueueFull(cap) => ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "overloaded_error",
            "queue_full",
            format!(
                "the server is busy: all {} slots are in use and {cap} requests are waiting; \
                 retry later",
                ready.engine.limits.parallel
            ),
        ),
        SubmitError::TooLarge(need, budget) => ApiError::invalid(
            "max_tokens",
            format!(
                "this request can need {need} bytes of cache ({n} prompt + {max_tokens} \
                 completion tokens), more than the server's whole --cache-memory budget of \
                 {budget} bytes; send a shorter prompt or a smaller max_tokens"
            ),
        )
        .with_code("cache_memory_exceeded"),
        SubmitError::Stopped => internal("the engine has stopped".into()),
    })?;
    let env = Envelope {
        id: request_id(match endpoint {
            Endpoint::Chat => "chatcmpl",
            Endpoint::Completion => "cmpl",
        }),
        created: unix_now(),
        model: s.model_id.clone(),
        endpoint,
    };
    if r.stream {
        Ok(stream(env, rx, r.include_usage))
    } else {
        collect(env, rx).await
    }
}

fn endpoint_field(e: Endpoint) -> &'static str {
    match e {
        Endpoint::Chat => "messages",
        Endpoint::Completion => "prompt",
    }
}

async fn collect(env: Envelope, mut rx: UnboundedReceiver<Event>) -> Result<Response, ApiError> {
    let mut text = String::new();
    loop {
        match rx.recv().await {
            Some(Event::Text(t)) => text.push_str(&t),
            Some(Event::Done(reason, usage)) => {
                return Ok(Json(env.response(&text, reason.as_str(), usage)).into_response())
            }
            Some(Event::Failed(msg)) => return Err(internal(msg)),
            None => return Err(internal("the engine dropped the request".into())),
        }
    }
}

fn sse(v: &Value) -> String {
    format!("data: {v}\n\n")
}

struct StreamState {
    rx: UnboundedReceiver<Event>,
    env: Envelope,
    include_usage: bool,
    /// A chat stream opens with a chunk that carries the role.
    role_sent: bool,
}

/// Server-sent events: one `data: {chunk}` per piece of text, the finish reason in the last
/// chunk, the usage chunk when asked, then `data: [DONE]`. Dropping the stream (the client went
/// away) closes the channel, which the engine sees before its next step.
fn stream(env: Envelope, rx: UnboundedReceiver<Event>, include_usage: bool) -> Response {
    let role_sent = env.endpoint != Endpoint::Chat;
    let state = StreamState {
        rx,
        env,
        include_usage,
        role_sent,
    };
    let events = futures_util::stream::unfold(Some(state), |st| async move {
        let mut st = st?;
        let iu = st.include_usage;
        if !st.role_sent {
            st.role_sent = true;
            let first = sse(&st.env.chunk(Some(""), true, None, iu));
            return Some((Ok::<_, std::convert::Infallible>(first), Some(st)));
        }
        match st.rx.recv().await {
            Some(Event::Text(t)) => {
                let c = sse(&st.env.chunk(Some(&t), false, None, iu));
                Some((Ok(c), Some(st)))
            }
            Some(Event::Done(reason, usage)) => {
                let mut out = sse(&st.env.chunk(None, false, Some(reason.as_str()), iu));
                if iu {
                    out += &sse(&st.env.usage_chunk(usage));
                }
                out += "data: [DONE]\n\n";
                Some((Ok(out), None))
            }
            Some(Event::Failed(msg)) => {
                let out = sse(&internal(msg).body()) + "data: [DONE]\n\n";
                Some((Ok(out), None))
            }
            None => None,
        }
    });
    (
        [
            (header::CONTENT_TYPE, "text/event-stream"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        Body::from_stream(events),
    )
        .into_response()
}

//! `serve` without a socket: the router driven with tower's `oneshot` over the real default
//! model (SmolLM2-135M-Instruct, Q4_1 GGUF) and a RecurFormer converted from it in memory.
//! Answers are checked against `generate` on the same prompt, streams against whole answers.

use super::http::{router, AppState, Ready, Shared};
use super::metrics::Metrics;
use super::{start_ready, EngineOptions};
use axum::body::Body;
use axum::http::{header, Request, StatusCode};
use axum::Router;
use recurformer::checkpoint::loader::LoadedModel;
use recurformer::formats::tokenizer::ChatMessage;
use recurformer::model::generate::{
    end_tokens, generate, GenerateRequest, Sampler, SamplingParams,
};
use serde_json::{json, Value};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};
use tower::ServiceExt;

const ID: &str = "smollm2-135m-instruct-q4_1.gguf";

fn base() -> Arc<LoadedModel> {
    static M: OnceLock<Arc<LoadedModel>> = OnceLock::new();
    M.get_or_init(|| {
        let p = recurformer::default_model_path();
        assert!(
            p.exists(),
            "{} is missing: run scripts/setup.sh",
            p.display()
        );
        Arc::new(recurformer::checkpoint::loader::load(&p).expect("loading the default model"))
    })
    .clone()
}

fn opts(parallel: usize) -> EngineOptions {
    EngineOptions {
        parallel,
        queue: 8,
        cache_memory: None,
        prefix_cache: 0,
    }
}

fn shared(ready: Option<Ready>, metrics: Arc<Metrics>, api_key: Option<&str>) -> AppState {
    let s = Arc::new(Shared {
        model_id: ID.into(),
        api_key: api_key.map(String::from),
        max_body_bytes: 64 << 10,
        metrics,
        ready: OnceLock::new(),
        started: 0,
    });
    if let Some(r) = ready {
        let _ = s.ready.set(r);
    }
    s
}

/// A router over `loaded` with an engine started with `o`.
fn app_with(loaded: Arc<LoadedModel>, o: EngineOptions) -> (Router, AppState) {
    let metrics = Arc::new(Metrics::default());
    let ready = start_ready(loaded, o, metrics.clone()).expect("starting the engine");
    let s = shared(Some(ready), metrics, None);
    (router(s.clone()), s)
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

struct Reply {
    status: StatusCode,
    content_type: String,
    body: String,
}

impl Reply {
    fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }
    /// The `data:` payloads of a server-sent event stream.
    fn events(&self) -> Vec<String> {
        self.body
            .split("\n\n")
            .filter(|e| !e.is_empty())
            .map(|e| {
                e.strip_prefix("data: ")
                    .unwrap_or_else(|| panic!("event without 'data: ': {e:?}"))
                    .to_string()
            })
            .collect()
    }
}

async fn send(app: &Router, req: Request<Body>) -> Reply {
    let resp = app.clone().oneshot(req).await.expect("infallible router");
    let status = resp.status();
    let content_type = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .map(|v| v.to_str().unwrap_or("").to_string())
        .unwrap_or_default();
    let bytes = axum::body::to_bytes(resp.into_body(), usize::MAX)
        .await
        .expect("body");
    Reply {
        status,
        content_type,
        body: String::from_utf8(bytes.to_vec()).expect("UTF-8 body"),
    }
}

fn post(path: &str, body: &Value) -> Request<Body> {
    Request::post(path)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(body.to_string()))
        .expect("request")
}

fn get(path: &str) -> Request<Body> {
    Request::get(path).body(Body::empty()).expect("request")
}

/// What `generate` answers to one chat message, greedy.
fn generate_chat(loaded: &LoadedModel, user: &str, max_tokens: usize) -> String {
    let tok = loaded.tokenizer().expect("tokenizer");
    let text = tok
        .apply_chat_template(
            &[ChatMessage {
                role: "user".into(),
                content: user.into(),
            }],
            true,
        )
        .expect("template");
    let ids = tok.encode(&text, false).expect("encode");
    let eos = end_tokens(&loaded.model.cfg.eos_token_ids, tok, true);
    let mut sampler = Sampler::new(SamplingParams::default()).expect("sampler");
    let (out, _) = generate(
        &loaded.model,
        &GenerateRequest {
            prompt: &ids,
            max_tokens,
            eos: &eos,
        },
        &mut sampler,
        &mut |_| Ok(()),
    )
    .expect("generate");
    let kept: Vec<u32> = out.into_iter().filter(|t| !eos.contains(t)).collect();
    tok.decode(&kept, true).expect("decode")
}

fn chat_body(user: &str, max_tokens: usize) -> Value {
    json!({
        "model": ID,
        "messages": [{"role": "user", "content": user}],
        "max_tokens": max_tokens,
        "temperature": 0,
    })
}

/// The text and last chunk of a chat stream, checking its shape on the way.
fn read_chat_stream(r: &Reply, include_usage: bool) -> (String, Value, Option<Value>) {
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert!(
        r.content_type.starts_with("text/event-stream"),
        "{}",
        r.content_type
    );
    let ev = r.events();
    assert_eq!(ev.last().map(String::as_str), Some("[DONE]"), "{ev:?}");
    let chunks: Vec<Value> = ev[..ev.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).expect("chunk JSON"))
        .collect();
    let (usage, choice_chunks) = if include_usage {
        let (last, rest) = chunks.split_last().expect("chunks");
        assert_eq!(last["choices"], json!([]), "{last}");
        for c in rest {
            assert!(c["usage"].is_null() && c.get("usage").is_some(), "{c}");
        }
        (Some(last["usage"].clone()), rest.to_vec())
    } else {
        assert!(chunks.iter().all(|c| c.get("usage").is_none()));
        (None, chunks)
    };
    assert_eq!(
        choice_chunks[0]["choices"][0]["delta"]["role"], "assistant",
        "the first chunk carries the role"
    );
    let id = choice_chunks[0]["id"].clone();
    let mut text = String::new();
    for (i, c) in choice_chunks.iter().enumerate() {
        assert_eq!(c["object"], "chat.completion.chunk");
        assert_eq!(c["id"], id, "one id for the whole stream");
        let fin = &c["choices"][0]["finish_reason"];
        assert_eq!(fin.is_null(), i + 1 < choice_chunks.len(), "{c}");
        if let Some(t) = c["choices"][0]["delta"]["content"].as_str() {
            text.push_str(t);
        }
    }
    (text, choice_chunks.last().cloned().expect("chunk"), usage)
}

#[test]
fn chat_answers_like_generate_streamed_or_not() {
    let loaded = base();
    let (app, s) = app_with(loaded.clone(), opts(2));
    let q = "Name three colours.";
    let want = generate_chat(&loaded, q, 20);
    assert!(!want.is_empty());
    rt().block_on(async {
        let r = send(&app, post("/v1/chat/completions", &chat_body(q, 20))).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.body);
        assert!(r.content_type.starts_with("application/json"));
        let v = r.json();
        assert_eq!(v["object"], "chat.completion");
        assert_eq!(v["model"], ID);
        assert!(v["id"].as_str().unwrap().starts_with("chatcmpl-"));
        let msg = &v["choices"][0]["message"];
        assert_eq!(msg["role"], "assistant");
        assert_eq!(msg["content"], want.as_str(), "server vs generate");
        let usage = &v["usage"];
        let completion = usage["completion_tokens"].as_u64().unwrap();
        let finish = v["choices"][0]["finish_reason"].as_str().unwrap();
        assert!(
            (finish == "length" && completion == 20) || (finish == "stop" && completion < 20),
            "{v}"
        );
        assert_eq!(
            usage["total_tokens"].as_u64().unwrap(),
            usage["prompt_tokens"].as_u64().unwrap() + completion
        );

        // Streamed, with and without the usage chunk: the same text and finish reason.
        for include_usage in [false, true] {
            let mut body = chat_body(q, 20);
            body["stream"] = json!(true);
            if include_usage {
                body["stream_options"] = json!({"include_usage": true});
            }
            let r = send(&app, post("/v1/chat/completions", &body)).await;
            let (text, last, u) = read_chat_stream(&r, include_usage);
            assert_eq!(text, want, "stream vs generate");
            assert_eq!(last["choices"][0]["finish_reason"], finish);
            if let Some(u) = u {
                assert_eq!(&u, usage);
            }
        }
    });
    assert_eq!(s.metrics.requests_finished.get(), 3);
    assert!(s.metrics.generated_tokens.get() >= 3);
    settled(&s.metrics);
}

#[test]
fn completions_stop_sequences_lengths_and_seeds() {
    let (app, _) = app_with(base(), opts(2));
    rt().block_on(async {
        let prompt = "The capital of France is Paris. The capital of Italy is";
        let body = |extra: Value| {
            let mut b = json!({"prompt": prompt, "max_tokens": 12, "temperature": 0});
            for (k, v) in extra.as_object().unwrap() {
                b[k] = v.clone();
            }
            b
        };
        let r = send(&app, post("/v1/completions", &body(json!({})))).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.body);
        let v = r.json();
        assert_eq!(v["object"], "text_completion");
        let full = v["choices"][0]["text"].as_str().unwrap().to_string();
        assert_eq!(v["choices"][0]["finish_reason"], "length", "{v}");
        assert_eq!(v["usage"]["completion_tokens"], 12);

        // A stop sequence taken from inside the greedy answer cuts it there.
        let words: Vec<&str> = full.split_whitespace().collect();
        assert!(words.len() >= 3, "{full:?}");
        let stop = format!(" {}", words[2]);
        let cut = &full[..full.find(&stop).unwrap()];
        for stream in [false, true] {
            let r = send(
                &app,
                post(
                    "/v1/completions",
                    &body(json!({"stop": [stop], "stream": stream})),
                ),
            )
            .await;
            assert_eq!(r.status, StatusCode::OK, "{}", r.body);
            let (text, finish) = if stream {
                let ev = r.events();
                assert_eq!(ev.last().unwrap(), "[DONE]");
                let chunks: Vec<Value> = ev[..ev.len() - 1]
                    .iter()
                    .map(|e| serde_json::from_str(e).unwrap())
                    .collect();
                let text: String = chunks
                    .iter()
                    .map(|c| c["choices"][0]["text"].as_str().unwrap().to_string())
                    .collect();
                (
                    text,
                    chunks.last().unwrap()["choices"][0]["finish_reason"].clone(),
                )
            } else {
                let v = r.json();
                (
                    v["choices"][0]["text"].as_str().unwrap().to_string(),
                    v["choices"][0]["finish_reason"].clone(),
                )
            };
            assert_eq!(text, cut, "stream {stream}");
            assert_eq!(finish, "stop");
        }

        // Token ids as the prompt give the same answer as the text (BOS added the same way).
        let ids = base().tokenizer().unwrap().encode(prompt, true).unwrap();
        let r = send(&app, post("/v1/completions", &body(json!({"prompt": ids})))).await;
        assert_eq!(r.json()["choices"][0]["text"], full.as_str());

        // Sampling: one seed reproduces its text, another seed gives another.
        let sample = |seed: u64| {
            body(json!({"temperature": 1.0, "top_p": 0.95, "seed": seed, "max_tokens": 24}))
        };
        let mut texts = vec![];
        for seed in [7u64, 7, 8] {
            let r = send(&app, post("/v1/completions", &sample(seed))).await;
            assert_eq!(r.status, StatusCode::OK, "{}", r.body);
            texts.push(r.json()["choices"][0]["text"].as_str().unwrap().to_string());
        }
        assert_eq!(texts[0], texts[1], "same seed");
        assert_ne!(texts[0], texts[2], "different seeds");
    });
}

/// Each bad request: (what, method, path, content type, body, status, error code).
fn bad_requests() -> Vec<(
    &'static str,
    &'static str,
    &'static str,
    &'static str,
    String,
    u16,
    &'static str,
)> {
    let ok = chat_body("Hi", 4);
    let with = |k: &str, v: Value| {
        let mut b = ok.clone();
        b[k] = v;
        b.to_string()
    };
    let json_ct = "application/json";
    let chat = "/v1/chat/completions";
    let long_prompt = "word ".repeat(9000);
    vec![
        (
            "malformed JSON",
            "POST",
            chat,
            json_ct,
            "{\"messages\": [".into(),
            400,
            "invalid_json",
        ),
        (
            "body not an object",
            "POST",
            chat,
            json_ct,
            "[1, 2]".into(),
            400,
            "invalid_json",
        ),
        (
            "wrong content type",
            "POST",
            chat,
            "text/plain",
            ok.to_string(),
            415,
            "unsupported_media_type",
        ),
        (
            "missing messages",
            "POST",
            chat,
            json_ct,
            json!({"max_tokens": 3}).to_string(),
            400,
            "missing_required_parameter",
        ),
        (
            "messages not an array",
            "POST",
            chat,
            json_ct,
            with("messages", json!("hi")),
            400,
            "invalid_value",
        ),
        (
            "empty messages",
            "POST",
            chat,
            json_ct,
            with("messages", json!([])),
            400,
            "invalid_value",
        ),
        (
            "unknown role",
            "POST",
            chat,
            json_ct,
            with("messages", json!([{"role": "robot", "content": "x"}])),
            400,
            "invalid_value",
        ),
        (
            "image content",
            "POST",
            chat,
            json_ct,
            with(
                "messages",
                json!([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]),
            ),
            400,
            "invalid_value",
        ),
        (
            "temperature out of range",
            "POST",
            chat,
            json_ct,
            with("temperature", json!(3.5)),
            400,
            "invalid_value",
        ),
        (
            "temperature a string",
            "POST",
            chat,
            json_ct,
            with("temperature", json!("hot")),
            400,
            "invalid_value",
        ),
        (
            "top_p zero",
            "POST",
            chat,
            json_ct,
            with("top_p", json!(0)),
            400,
            "invalid_value",
        ),
        (
            "max_tokens zero",
            "POST",
            chat,
            json_ct,
            with("max_tokens", json!(0)),
            400,
            "invalid_value",
        ),
        (
            "max_tokens fractional",
            "POST",
            chat,
            json_ct,
            with("max_tokens", json!(2.5)),
            400,
            "invalid_value",
        ),
        (
            "n = 2",
            "POST",
            chat,
            json_ct,
            with("n", json!(2)),
            400,
            "unsupported_parameter",
        ),
        (
            "logprobs",
            "POST",
            chat,
            json_ct,
            with("logprobs", json!(true)),
            400,
            "unsupported_parameter",
        ),
        (
            "presence penalty",
            "POST",
            chat,
            json_ct,
            with("presence_penalty", json!(0.5)),
            400,
            "unsupported_parameter",
        ),
        (
            "unknown field",
            "POST",
            chat,
            json_ct,
            with("temprature", json!(0.5)),
            400,
            "unknown_parameter",
        ),
        (
            "stream_options without stream",
            "POST",
            chat,
            json_ct,
            with("stream_options", json!({"include_usage": true})),
            400,
            "invalid_value",
        ),
        (
            "five stop sequences",
            "POST",
            chat,
            json_ct,
            with("stop", json!(["a", "b", "c", "d", "e"])),
            400,
            "invalid_value",
        ),
        (
            "stop not a string",
            "POST",
            chat,
            json_ct,
            with("stop", json!(3)),
            400,
            "invalid_value",
        ),
        (
            "another model",
            "POST",
            chat,
            json_ct,
            with("model", json!("gpt-4o")),
            404,
            "model_not_found",
        ),
        (
            "max_tokens over the context",
            "POST",
            chat,
            json_ct,
            with("max_tokens", json!(100000)),
            400,
            "context_length_exceeded",
        ),
        (
            "prompt over the context",
            "POST",
            "/v1/completions",
            json_ct,
            json!({"prompt": long_prompt}).to_string(),
            400,
            "context_length_exceeded",
        ),
        (
            "body over the limit",
            "POST",
            chat,
            json_ct,
            with(
                "messages",
                json!([{"role": "user", "content": "x".repeat(70_000)}]),
            ),
            413,
            "request_too_large",
        ),
        (
            "several prompts",
            "POST",
            "/v1/completions",
            json_ct,
            json!({"prompt": ["a", "b"]}).to_string(),
            400,
            "unsupported_parameter",
        ),
        (
            "token id outside the vocabulary",
            "POST",
            "/v1/completions",
            json_ct,
            json!({"prompt": [1, 99999999]}).to_string(),
            400,
            "invalid_value",
        ),
        (
            "unknown route",
            "GET",
            "/v2/nothing",
            json_ct,
            String::new(),
            404,
            "unknown_url",
        ),
        (
            "wrong method",
            "GET",
            chat,
            json_ct,
            String::new(),
            405,
            "method_not_allowed",
        ),
    ]
}

#[test]
fn bad_requests_get_their_status_and_an_error_body_and_leave_the_server_healthy() {
    let (app, s) = app_with(base(), opts(2));
    rt().block_on(async {
        let cases = bad_requests();
        assert!(cases.len() >= 15);
        for (what, method, path, ct, body, status, code) in cases {
            let req = Request::builder()
                .method(method)
                .uri(path)
                .header(header::CONTENT_TYPE, ct)
                .body(Body::from(body))
                .unwrap();
            let r = send(&app, req).await;
            assert_eq!(r.status.as_u16(), status, "{what}: {}", r.body);
            let v = r.json();
            let e = &v["error"];
            assert_eq!(e["code"], code, "{what}: {v}");
            assert!(e["type"].is_string(), "{what}: {v}");
            let msg = e["message"].as_str().unwrap_or("");
            assert!(msg.len() > 10, "{what}: a message that says something: {v}");
            if what == "prompt over the context" {
                // The prompt's token count and the context size, in the message.
                let n = base()
                    .tokenizer()
                    .unwrap()
                    .encode(&"word ".repeat(9000), true)
                    .unwrap()
                    .len();
                assert!(n > 8192);
                assert!(
                    msg.contains("8192") && msg.contains(&format!("{n} tokens")),
                    "{msg}"
                );
            }
        }
        // Still healthy, and still answering correctly.
        assert_eq!(send(&app, get("/health")).await.status, StatusCode::OK);
        let r = send(
            &app,
            post("/v1/chat/completions", &chat_body("Name three colours.", 8)),
        )
        .await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.body);
        assert_eq!(
            r.json()["choices"][0]["message"]["content"],
            generate_chat(&base(), "Name three colours.", 8).as_str()
        );
    });
    assert!(s.metrics.requests_invalid.get() >= 15);
    settled(&s.metrics);
    assert_eq!(s.metrics.queue_length.get(), 0);
}

#[test]
fn health_models_metrics_loading_and_api_key() {
    rt().block_on(async {
        // While loading: /health and completions answer 503 with an error body.
        let loading = router(shared(None, Arc::new(Metrics::default()), None));
        let r = send(&loading, get("/health")).await;
        assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(r.json()["error"]["code"], "model_loading");
        let r = send(&loading, post("/v1/chat/completions", &chat_body("Hi", 2))).await;
        assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);

        let metrics = Arc::new(Metrics::default());
        let ready = start_ready(base(), opts(1), metrics.clone()).unwrap();
        let app = router(shared(Some(ready), metrics, Some("sekret")));
        // /health is open; everything else needs the key.
        assert_eq!(send(&app, get("/health")).await.status, StatusCode::OK);
        for auth in [None, Some("Bearer wrong"), Some("sekret")] {
            let mut req = Request::get("/v1/models");
            if let Some(a) = auth {
                req = req.header(header::AUTHORIZATION, a);
            }
            let r = send(&app, req.body(Body::empty()).unwrap()).await;
            assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{auth:?}");
            assert_eq!(r.json()["error"]["code"], "invalid_api_key");
        }
        let r = send(
            &app,
            Request::get("/v1/models")
                .header(header::AUTHORIZATION, "Bearer sekret")
                .body(Body::empty())
                .unwrap(),
        )
        .await;
        assert_eq!(r.status, StatusCode::OK);
        let v = r.json();
        assert_eq!(v["data"][0]["id"], ID);
        assert_eq!(v["data"][0]["meta"]["context_length"], 8192);
        // SmolLM2-135M: 30 layers x 3 KV heads x 64 x (K and V) x 4 bytes.
        assert_eq!(
            v["data"][0]["meta"]["kv_cache_bytes_per_token"],
            30 * 3 * 64 * 2 * 4
        );

        let r = send(
            &app,
            Request::get("/metrics")
                .header(header::AUTHORIZATION, "Bearer sekret")
                .body(Body::empty())
                .unwrap(),
        )
        .await;
        assert_eq!(r.status, StatusCode::OK);
        assert!(r.content_type.starts_with("text/plain"));
        for name in [
            "recurformer_requests_received_total 0",
            "recurformer_requests_invalid_total 3",
            "recurformer_slots 1",
            "recurformer_queue_length 0",
            "recurformer_cache_bytes{kind=\"kv\"} 0",
            "recurformer_time_to_first_token_seconds_count 0",
            "# TYPE recurformer_time_per_output_token_seconds histogram",
        ] {
            assert!(r.body.contains(name), "{name} in\n{}", r.body);
        }
    });
}

/// Waits until the engine has retired every sequence: it frees a slot just after it sends the
/// end of the answer, so a client can see the answer a moment before the gauge drops.
fn settled(m: &Metrics) {
    let t0 = Instant::now();
    while m.active_sequences.get() != 0 {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "a slot was never freed"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Polls `cond` (the engine runs on its own thread) for up to `secs`.
async fn wait_for(what: &str, secs: u64, cond: impl Fn() -> bool) {
    let t0 = Instant::now();
    while !cond() {
        assert!(
            t0.elapsed() < Duration::from_secs(secs),
            "timed out waiting for {what}"
        );
        tokio::task::yield_now().await;
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn concurrent_requests_batch_and_match_their_answers_alone() {
    let loaded = base();
    let (app, s) = app_with(loaded.clone(), opts(4));
    let qs = [
        "Name three colours.",
        "What is 2 + 2?",
        "Say hello in French.",
        "Name a fruit.",
    ];
    let want: Vec<String> = qs.iter().map(|q| generate_chat(&loaded, q, 16)).collect();
    let got: Vec<String> = rt().block_on(async {
        let tasks: Vec<_> = qs
            .iter()
            .map(|q| {
                let app = app.clone();
                let body = chat_body(q, 16);
                tokio::spawn(async move { send(&app, post("/v1/chat/completions", &body)).await })
            })
            .collect();
        let mut out = vec![];
        for t in tasks {
            let r = t.await.unwrap();
            assert_eq!(r.status, StatusCode::OK, "{}", r.body);
            out.push(
                r.json()["choices"][0]["message"]["content"]
                    .as_str()
                    .unwrap()
                    .to_string(),
            );
        }
        out
    });
    assert_eq!(got, want);
    let (steps, rows) = (s.metrics.decode_steps.get(), s.metrics.decode_rows.get());
    println!("decode steps {steps}, sequence steps {rows}");
    assert!(
        rows as f64 / steps as f64 > 1.5,
        "decode steps were batched: {rows} / {steps}"
    );
}

#[test]
fn queue_full_and_cache_budget_are_enforced_and_disconnects_free_slots() {
    let loaded = base();
    let (kv, state) = loaded.model.cache_bytes_per_token_and_state();
    rt().block_on(async {
        // One slot, one place in the queue: the third request is refused with 503.
        let metrics = Arc::new(Metrics::default());
        let ready = start_ready(
            loaded.clone(),
            EngineOptions {
                parallel: 1,
                queue: 1,
                cache_memory: None,
                prefix_cache: 0,
            },
            metrics.clone(),
        )
        .unwrap();
        let app = router(shared(Some(ready), metrics.clone(), None));
        let long = {
            let mut b = chat_body("Tell me a long story about a dragon.", 400);
            b["stream"] = json!(true);
            b
        };
        // A streamed request whose body is dropped after the first chunk: a client that left.
        let resp = app
            .clone()
            .oneshot(post("/v1/chat/completions", &long))
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        wait_for("the first sequence to start", 30, || {
            metrics.active_sequences.get() == 1 && metrics.generated_tokens.get() >= 1
        })
        .await;
        let app2 = app.clone();
        let queued = tokio::spawn(async move {
            send(
                &app2,
                post("/v1/chat/completions", &chat_body("Name a fruit.", 4)),
            )
            .await
        });
        wait_for("the second request to queue", 30, || {
            metrics.queue_length.get() == 1
        })
        .await;
        let r = send(&app, post("/v1/chat/completions", &chat_body("Hi", 4))).await;
        assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE, "{}", r.body);
        assert_eq!(r.json()["error"]["code"], "queue_full");
        // The client of the long stream leaves: its slot goes to the queued request.
        let generated_before = metrics.generated_tokens.get();
        drop(resp);
        let r = queued.await.unwrap();
        assert_eq!(r.status, StatusCode::OK, "{}", r.body);
        assert_eq!(metrics.requests_cancelled.get(), 1);
        assert!(
            metrics.generated_tokens.get() < generated_before + 40,
            "the abandoned sequence stopped decoding"
        );
        wait_for("the slot to be freed", 10, || {
            metrics.active_sequences.get() == 0
        })
        .await;

        // A budget that holds one sequence of (prompt + 24) tokens but not two: the second
        // waits for the first, and a request larger than the whole budget is refused.
        let metrics = Arc::new(Metrics::default());
        let qs = ["Name a fruit.", "Name a tree."];
        let lens: Vec<usize> = qs
            .iter()
            .map(|q| {
                let t = loaded.tokenizer().unwrap();
                let msg = ChatMessage {
                    role: "user".into(),
                    content: q.to_string(),
                };
                t.encode(&t.apply_chat_template(&[msg], true).unwrap(), false)
                    .unwrap()
                    .len()
            })
            .collect();
        let need = |n: usize| kv * (n + 24) + state;
        let budget = need(lens[0].max(lens[1])) + kv * 4;
        assert!(budget < need(lens[0]) + need(lens[1]));
        let ready = start_ready(
            loaded.clone(),
            EngineOptions {
                parallel: 4,
                queue: 4,
                cache_memory: Some(budget),
                prefix_cache: 0,
            },
            metrics.clone(),
        )
        .unwrap();
        let app = router(shared(Some(ready), metrics.clone(), None));
        let r = send(&app, post("/v1/chat/completions", &chat_body("Hi", 200))).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST);
        assert_eq!(r.json()["error"]["code"], "cache_memory_exceeded");
        let tasks: Vec<_> = qs
            .iter()
            .map(|q| {
                let app = app.clone();
                let body = chat_body(q, 24);
                tokio::spawn(async move { send(&app, post("/v1/chat/completions", &body)).await })
            })
            .collect();
        let mut max_active = 0;
        while !tasks.iter().all(|t| t.is_finished()) {
            max_active = max_active.max(metrics.active_sequences.get());
            assert!(metrics.cache_reserved_bytes.get() as usize <= budget);
            tokio::task::yield_now().await;
            std::thread::sleep(Duration::from_millis(2));
        }
        for t in tasks {
            assert_eq!(t.await.unwrap().status, StatusCode::OK);
        }
        assert_eq!(max_active, 1, "the budget admits one sequence at a time");
    });
}

#[test]
fn a_recurformer_is_served_like_generate_runs_it() {
    use recurformer::convert::init::{convert, ConvertOptions};
    use recurformer::model::hybrid::{Init, LocalWindow, Provenance};
    use recurformer::model::plan::Plan;
    let b = base();
    let cfg = &b.model.cfg;
    // Group 0 of every other layer becomes a mixer with windowed heads beside it.
    let groups: Vec<Vec<usize>> = (0..cfg.num_hidden_layers)
        .map(|l| if l % 2 == 0 { vec![0] } else { vec![] })
        .collect();
    let plan = Plan::from_groups(cfg, &groups).unwrap();
    let hybrid = convert(
        &b.model,
        &ConvertOptions {
            plan: &plan,
            recency: None,
            init: Init::Random,
            seed: 1,
            provenance: Provenance {
                base_model: "test".into(),
                recency: None,
                plan_file: None,
                seed: 1,
                recurformer_version: "test".into(),
                training: vec![],
            },
            local: Some(LocalWindow {
                sinks: 4,
                window: 8,
            }),
        },
    )
    .unwrap();
    let p = recurformer::default_model_path();
    let tokenizer = recurformer::checkpoint::loader::load(&p).unwrap().tokenizer;
    let loaded = Arc::new(LoadedModel {
        model: hybrid,
        tokenizer,
        format: recurformer::checkpoint::loader::SourceFormat::HfDir,
        path: p,
    });
    let (kv, state) = loaded.model.cache_bytes_per_token_and_state();
    assert!(state > 0);
    let (app, s) = app_with(loaded.clone(), opts(2));
    let qs = ["Name three colours.", "What is 2 + 2?"];
    let want: Vec<String> = qs.iter().map(|q| generate_chat(&loaded, q, 12)).collect();
    rt().block_on(async {
        let r = send(&app, get("/v1/models")).await;
        let meta = &r.json()["data"][0]["meta"];
        assert_eq!(meta["recurformer"], true);
        assert_eq!(meta["kv_cache_bytes_per_token"], kv);
        assert_eq!(meta["kv_cache_dtype"], "f32");
        assert_eq!(meta["recurrent_state_bytes"], state);
        let tasks: Vec<_> = qs
            .iter()
            .map(|q| {
                let app = app.clone();
                let body = chat_body(q, 12);
                tokio::spawn(async move { send(&app, post("/v1/chat/completions", &body)).await })
            })
            .collect();
        for (t, w) in tasks.into_iter().zip(&want) {
            let r = t.await.unwrap();
            assert_eq!(r.status, StatusCode::OK, "{}", r.body);
            assert_eq!(r.json()["choices"][0]["message"]["content"], w.as_str());
        }
    });
    assert_eq!(s.metrics.requests_finished.get(), 2);
}

#[test]
fn cache_memory_sizes_parse_with_binary_suffixes() {
    use super::parse_bytes;
    assert_eq!(parse_bytes("1500"), Ok(1500));
    assert_eq!(parse_bytes("2G"), Ok(2 << 30));
    assert_eq!(parse_bytes("512m"), Ok(512 << 20));
    assert_eq!(parse_bytes("1.5K"), Ok(1536));
    assert!(parse_bytes("12X").unwrap_err().contains("suffix 'X'"));
    assert!(parse_bytes("0").unwrap_err().contains("positive"));
    assert!(parse_bytes("lots")
        .unwrap_err()
        .contains("not a byte count"));
}

#[test]
fn the_next_chat_turn_reuses_the_cache_and_answers_as_without_it() {
    let loaded = base();
    let with = |prefix_cache| {
        app_with(
            loaded.clone(),
            EngineOptions {
                prefix_cache,
                ..opts(1)
            },
        )
    };
    let (reuse, s) = with(64 << 20);
    let (fresh, _) = with(0);
    rt().block_on(async {
        let first = chat_body("Name three colours.", 12);
        let r = send(&reuse, post("/v1/chat/completions", &first))
            .await
            .json();
        let first_prompt = r["usage"]["prompt_tokens"].as_u64().unwrap();
        let answer = r["choices"][0]["message"]["content"]
            .as_str()
            .unwrap()
            .to_string();
        let second = json!({
            "messages": [
                {"role": "user", "content": "Name three colours."},
                {"role": "assistant", "content": answer},
                {"role": "user", "content": "And three animals?"},
            ],
            "max_tokens": 12,
            "temperature": 0,
        });
        let before = s.metrics.prefix_reused_tokens.get();
        let a = send(&reuse, post("/v1/chat/completions", &second))
            .await
            .json();
        let reused = s.metrics.prefix_reused_tokens.get() - before;
        let prompt = a["usage"]["prompt_tokens"].as_u64().unwrap();
        println!("second turn: {reused} of {prompt} prompt tokens restored");
        // More than the first prompt: the snapshot taken at the end of the first answer.
        assert!(
            reused > first_prompt && reused < prompt,
            "{reused} of {prompt}"
        );
        let b = send(&fresh, post("/v1/chat/completions", &second))
            .await
            .json();
        assert_eq!(
            a["choices"][0]["message"]["content"],
            b["choices"][0]["message"]["content"]
        );
    });
    assert!(s.metrics.prefix_cache_bytes.get() > 0);
}

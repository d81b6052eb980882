//! The OpenAI wire format: request parsing with exact errors, and the response bodies.
//!
//! Requests are read from a `serde_json::Value` field by field rather than derived, so that every
//! refusal names the field, what it must be and what was sent, as the OpenAI API does
//! ("Unrecognized request argument supplied: foo"). Fields that would change the result and are
//! not implemented (`n` > 1, penalties, logit bias, logprobs, tools, ...) are refused, never
//! silently ignored; fields that change nothing here (`user`, `metadata`, ...) are accepted.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use recurformer::formats::tokenizer::ChatMessage;
use serde_json::{json, Map, Value};

/// An error answered as OpenAI does: `{"error": {"message", "type", "param", "code"}}`.
#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    pub kind: &'static str,
    pub code: &'static str,
    pub param: Option<String>,
}

impl ApiError {
    pub fn new(status: StatusCode, kind: &'static str, code: &'static str, msg: String) -> Self {
        ApiError {
            status,
            message: msg,
            kind,
            code,
            param: None,
        }
    }

    /// 400 about one request field.
    pub fn invalid(param: &str, msg: String) -> Self {
        ApiError {
            param: Some(param.to_string()),
            ..Self::new(
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                "invalid_value",
                msg,
            )
        }
    }

    pub fn with_code(mut self, code: &'static str) -> Self {
        self.code = code;
        self
    }

    pub fn body(&self) -> Value {
        json!({"error": {
            "message": self.message,
            "type": self.kind,
            "param": self.param,
            "code": self.code,
        }})
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, axum::Json(self.body())).into_response()
    }
}

/// Which endpoint a request came through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    Chat,
    Completion,
}

/// What a completion request asks for, validated.
#[derive(Debug, Clone, PartialEq)]
pub struct CompletionRequest {
    pub input: Input,
    /// None: until the end of the turn or the context is full.
    pub max_tokens: Option<usize>,
    pub temperature: f64,
    pub top_p: Option<f64>,
    pub top_k: Option<usize>,
    pub repetition_penalty: f32,
    /// None: a fresh seed per request.
    pub seed: Option<u64>,
    pub stop: Vec<String>,
    pub stream: bool,
    pub include_usage: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Input {
    Messages(Vec<ChatMessage>),
    Text(String),
    Tokens(Vec<u32>),
}

/// Fields accepted and without effect on the result.
const HARMLESS: [&str; 5] = ["model", "user", "metadata", "store", "service_tier"];

/// Fields refused unless they carry their neutral value (what `neutral` accepts).
fn neutral(field: &str, v: &Value) -> Option<bool> {
    let zero = |v: &Value| v.is_null() || v.as_f64() == Some(0.0);
    Some(match field {
        "frequency_penalty" | "presence_penalty" => zero(v),
        "logit_bias" => v.is_null() || v.as_object().is_some_and(|m| m.is_empty()),
        "logprobs" => v.is_null() || v == &Value::Bool(false),
        "top_logprobs" => zero(v),
        "echo" => v.is_null() || v == &Value::Bool(false),
        "best_of" => v.is_null() || v.as_u64() == Some(1),
        "suffix" => v.is_null() || v.as_str() == Some(""),
        "tools" | "functions" => v.is_null() || v.as_array().is_some_and(|a| a.is_empty()),
        "tool_choice" | "function_call" => v.is_null() || v.as_str() == Some("none"),
        "parallel_tool_calls" => true,
        "response_format" => v.is_null() || v.get("type").and_then(Value::as_str) == Some("text"),
        _ => return None,
    })
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// `v` as JSON for an error message, cut short.
fn shown(v: &Value) -> String {
    let s = v.to_string();
    if s.len() > 80 {
        let mut end = 80;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        format!("{}...", &s[..end])
    } else {
        s
    }
}

fn number(o: &Map<String, Value>, k: &str, lo: f64, hi: f64) -> Result<Option<f64>, ApiError> {
    match o.get(k) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => match v.as_f64() {
            Some(x) if x >= lo && x <= hi => Ok(Some(x)),
            Some(x) => Err(ApiError::invalid(
                k,
                format!("'{k}' is {x}; it must be between {lo} and {hi}"),
            )),
            None => Err(ApiError::invalid(
                k,
                format!("'{k}' must be a number, got {}: {}", type_name(v), shown(v)),
            )),
        },
    }
}

fn integer(o: &Map<String, Value>, k: &str, lo: i64, hi: i64) -> Result<Option<i64>, ApiError> {
    match o.get(k) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => match v.as_i64() {
            Some(x) if x >= lo && x <= hi => Ok(Some(x)),
            Some(x) => Err(ApiError::invalid(
                k,
                format!("'{k}' is {x}; it must be between {lo} and {hi}"),
            )),
            None => Err(ApiError::invalid(
                k,
                format!(
                    "'{k}' must be an integer, got {}: {}",
                    type_name(v),
                    shown(v)
                ),
            )),
        },
    }
}

fn boolean(o: &Map<String, Value>, k: &str) -> Result<Option<bool>, ApiError> {
    match o.get(k) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(v) => Err(ApiError::invalid(
            k,
            format!(
                "'{k}' must be a boolean, got {}: {}",
                type_name(v),
                shown(v)
            ),
        )),
    }
}

/// Parses and validates a request body for `endpoint`. `served` is the model id this server
/// answers to; a request naming another model gets 404 as from OpenAI.
pub fn parse_request(
    body: &[u8],
    endpoint: Endpoint,
    served: &str,
) -> Result<CompletionRequest, ApiError> {
    let v: Value = serde_json::from_slice(body).map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            "invalid_json",
            format!("the request body is not valid JSON: {e}"),
        )
    })?;
    let o = match v {
        Value::Object(o) => o,
        other => {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                "invalid_json",
                format!(
                    "the request body must be a JSON object, got {}",
                    type_name(&other)
                ),
            ))
        }
    };
    let input_field = match endpoint {
        Endpoint::Chat => "messages",
        Endpoint::Completion => "prompt",
    };
    let known = [
        input_field,
        "max_tokens",
        "max_completion_tokens",
        "temperature",
        "top_p",
        "top_k",
        "repetition_penalty",
        "seed",
        "stop",
        "stream",
        "stream_options",
        "n",
    ];
    for (k, val) in &o {
        if known.contains(&k.as_str()) || HARMLESS.contains(&k.as_str()) {
            continue;
        }
        match neutral(k, val) {
            Some(true) => {}
            Some(false) => {
                return Err(ApiError::invalid(
                    k,
                    format!(
                        "'{k}' = {} is not supported by this server; remove it or send its \
                         neutral value",
                        shown(val)
                    ),
                )
                .with_code("unsupported_parameter"))
            }
            None => {
                return Err(ApiError::invalid(
                    k,
                    format!("Unrecognized request argument supplied: {k}"),
                )
                .with_code("unknown_parameter"))
            }
        }
    }
    match o.get("model") {
        None | Some(Value::Null) => {}
        Some(Value::String(m)) if m == served => {}
        Some(Value::String(m)) => {
            return Err(ApiError {
                param: Some("model".into()),
                ..ApiError::new(
                    StatusCode::NOT_FOUND,
                    "invalid_request_error",
                    "model_not_found",
                    format!("The model '{m}' does not exist; this server serves '{served}'"),
                )
            })
        }
        Some(v) => {
            return Err(ApiError::invalid(
                "model",
                format!("'model' must be a string, got {}", type_name(v)),
            ))
        }
    }
    if let Some(n) = integer(&o, "n", i64::MIN, i64::MAX)? {
        if n != 1 {
            return Err(ApiError::invalid(
                "n",
                format!("'n' is {n}; this server returns one choice per request (n = 1)"),
            )
            .with_code("unsupported_parameter"));
        }
    }
    let input = match endpoint {
        Endpoint::Chat => Input::Messages(parse_messages(o.get("messages"))?),
        Endpoint::Completion => parse_prompt(o.get("prompt"))?,
    };
    let a = integer(&o, "max_tokens", 1, i64::MAX)?;
    let b = integer(&o, "max_completion_tokens", 1, i64::MAX)?;
    if let (Some(a), Some(b)) = (a, b) {
        if a != b {
            return Err(ApiError::invalid(
                "max_tokens",
                format!("'max_tokens' ({a}) and 'max_completion_tokens' ({b}) disagree; send one"),
            ));
        }
    }
    let max_tokens = a.or(b).map(|x| x as usize);
    let stream = boolean(&o, "stream")?.unwrap_or(false);
    let include_usage = match o.get("stream_options") {
        None | Some(Value::Null) => false,
        Some(Value::Object(so)) => {
            if !stream {
                return Err(ApiError::invalid(
                    "stream_options",
                    "'stream_options' is only allowed when 'stream' is true".into(),
                ));
            }
            if let Some(k) = so.keys().find(|k| k.as_str() != "include_usage") {
                return Err(ApiError::invalid(
                    "stream_options",
                    format!("Unrecognized stream option: {k}"),
                ));
            }
            boolean(so, "include_usage")?.unwrap_or(false)
        }
        Some(v) => {
            return Err(ApiError::invalid(
                "stream_options",
                format!("'stream_options' must be an object, got {}", type_name(v)),
            ))
        }
    };
    let stop = match o.get("stop") {
        None | Some(Value::Null) => vec![],
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(a)) => a
            .iter()
            .map(|x| match x {
                Value::String(s) => Ok(s.clone()),
                other => Err(ApiError::invalid(
                    "stop",
                    format!("'stop' entries must be strings, got {}", type_name(other)),
                )),
            })
            .collect::<Result<Vec<_>, _>>()?,
        Some(v) => {
            return Err(ApiError::invalid(
                "stop",
                format!(
                    "'stop' must be a string or an array of strings, got {}",
                    type_name(v)
                ),
            ))
        }
    };
    if stop.len() > 4 {
        return Err(ApiError::invalid(
            "stop",
            format!("'stop' has {} sequences; at most 4 are allowed", stop.len()),
        ));
    }
    if stop.iter().any(|s| s.is_empty()) {
        return Err(ApiError::invalid(
            "stop",
            "'stop' sequences must not be empty".into(),
        ));
    }
    Ok(CompletionRequest {
        input,
        max_tokens,
        // OpenAI's default: sampling at temperature 1 unless the request says otherwise.
        temperature: number(&o, "temperature", 0.0, 2.0)?.unwrap_or(1.0),
        top_p: match number(&o, "top_p", 0.0, 1.0)? {
            Some(p) if p <= 0.0 => {
                return Err(ApiError::invalid(
                    "top_p",
                    format!("'top_p' is {p}; it must be greater than 0 and at most 1"),
                ))
            }
            Some(p) if p >= 1.0 => None,
            p => p,
        },
        top_k: integer(&o, "top_k", 1, i64::MAX)?.map(|k| k as usize),
        repetition_penalty: number(&o, "repetition_penalty", 0.01, 100.0)?.unwrap_or(1.0) as f32,
        // Any JSON integer, negative ones included, as its 64-bit pattern.
        seed: integer(&o, "seed", i64::MIN, i64::MAX)?.map(|s| s as u64),
        stop,
        stream,
        include_usage,
    })
}

fn parse_messages(v: Option<&Value>) -> Result<Vec<ChatMessage>, ApiError> {
    let arr = match v {
        None | Some(Value::Null) => {
            return Err(
                ApiError::invalid("messages", "'messages' is required".into())
                    .with_code("missing_required_parameter"),
            )
        }
        Some(Value::Array(a)) => a,
        Some(other) => {
            return Err(ApiError::invalid(
                "messages",
                format!("'messages' must be an array, got {}", type_name(other)),
            ))
        }
    };
    if arr.is_empty() {
        return Err(ApiError::invalid(
            "messages",
            "'messages' must hold at least one message".into(),
        ));
    }
    arr.iter()
        .enumerate()
        .map(|(i, m)| {
            let p = format!("messages[{i}]");
            let m = m.as_object().ok_or_else(|| {
                ApiError::invalid(&p, format!("'{p}' must be an object, got {}", type_name(m)))
            })?;
            if let Some(k) = m
                .keys()
                .find(|k| !["role", "content"].contains(&k.as_str()))
            {
                return Err(ApiError::invalid(
                    &format!("{p}.{k}"),
                    format!("'{p}.{k}' is not supported (messages carry 'role' and 'content')"),
                )
                .with_code("unsupported_parameter"));
            }
            let role = match m.get("role") {
                Some(Value::String(r))
                    if ["system", "developer", "user", "assistant"].contains(&r.as_str()) =>
                {
                    // The chat templates here know `system`; OpenAI's newer name means the same.
                    if r == "developer" {
                        "system".to_string()
                    } else {
                        r.clone()
                    }
                }
                Some(Value::String(r)) => {
                    return Err(ApiError::invalid(
                        &format!("{p}.role"),
                        format!(
                            "'{p}.role' is '{r}'; expected system, developer, user or assistant"
                        ),
                    ))
                }
                None => {
                    return Err(ApiError::invalid(
                        &format!("{p}.role"),
                        format!("'{p}.role' is required"),
                    )
                    .with_code("missing_required_parameter"))
                }
                Some(other) => {
                    return Err(ApiError::invalid(
                        &format!("{p}.role"),
                        format!("'{p}.role' must be a string, got {}", type_name(other)),
                    ))
                }
            };
            let content = match m.get("content") {
                Some(Value::String(s)) => s.clone(),
                Some(Value::Array(parts)) => {
                    let mut text = String::new();
                    for (j, part) in parts.iter().enumerate() {
                        match (
                            part.get("type").and_then(Value::as_str),
                            part.get("text").and_then(Value::as_str),
                        ) {
                            (Some("text"), Some(t)) => text.push_str(t),
                            _ => {
                                return Err(ApiError::invalid(
                                    &format!("{p}.content[{j}]"),
                                    format!(
                                        "'{p}.content[{j}]' must be a text part \
                                         {{\"type\": \"text\", \"text\": ...}}; this model reads \
                                         text only"
                                    ),
                                ))
                            }
                        }
                    }
                    text
                }
                None | Some(Value::Null) => {
                    return Err(ApiError::invalid(
                        &format!("{p}.content"),
                        format!("'{p}.content' is required"),
                    )
                    .with_code("missing_required_parameter"))
                }
                Some(other) => {
                    return Err(ApiError::invalid(
                        &format!("{p}.content"),
                        format!(
                            "'{p}.content' must be a string or an array of text parts, got {}",
                            type_name(other)
                        ),
                    ))
                }
            };
            Ok(ChatMessage { role, content })
        })
        .collect()
}

fn parse_prompt(v: Option<&Value>) -> Result<Input, ApiError> {
    let bad = |what: String| ApiError::invalid("prompt", what);
    match v {
        None | Some(Value::Null) => {
            Err(bad("'prompt' is required".into()).with_code("missing_required_parameter"))
        }
        Some(Value::String(s)) => Ok(Input::Text(s.clone())),
        Some(Value::Array(a)) => {
            if a.len() == 1 {
                if let Value::String(s) = &a[0] {
                    return Ok(Input::Text(s.clone()));
                }
            }
            if !a.is_empty() && a.iter().all(|x| x.is_string()) {
                return Err(bad(format!(
                    "'prompt' holds {} prompts; send one prompt per request",
                    a.len()
                ))
                .with_code("unsupported_parameter"));
            }
            let ids = a
                .iter()
                .map(|x| x.as_u64().and_then(|i| u32::try_from(i).ok()))
                .collect::<Option<Vec<u32>>>()
                .ok_or_else(|| {
                    bad(
                        "'prompt' must be a string, an array of one string, or an array of \
                         token ids"
                            .into(),
                    )
                })?;
            Ok(Input::Tokens(ids))
        }
        Some(other) => Err(bad(format!(
            "'prompt' must be a string or an array, got {}",
            type_name(other)
        ))),
    }
}

/// Token counts of a finished request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
}

impl Usage {
    pub fn json(&self) -> Value {
        json!({
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
        })
    }
}

/// The fields every response and chunk of one request share.
pub struct Envelope {
    pub id: String,
    pub created: u64,
    pub model: String,
    pub endpoint: Endpoint,
}

impl Envelope {
    fn object(&self, chunk: bool) -> &'static str {
        match (self.endpoint, chunk) {
            (Endpoint::Chat, false) => "chat.completion",
            (Endpoint::Chat, true) => "chat.completion.chunk",
            (Endpoint::Completion, _) => "text_completion",
        }
    }

    /// The whole answer of a request that was not streamed.
    pub fn response(&self, text: &str, finish: &str, usage: Usage) -> Value {
        let choice = match self.endpoint {
            Endpoint::Chat => json!({
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "logprobs": null,
                "finish_reason": finish,
            }),
            Endpoint::Completion => json!({
                "index": 0,
                "text": text,
                "logprobs": null,
                "finish_reason": finish,
            }),
        };
        json!({
            "id": self.id,
            "object": self.object(false),
            "created": self.created,
            "model": self.model,
            "choices": [choice],
            "usage": usage.json(),
        })
    }

    /// One streamed chunk: `role` only in a chat's first chunk, `finish` only in the last.
    /// With `include_usage` every chunk carries `"usage": null`, as OpenAI's do.
    pub fn chunk(
        &self,
        text: Option<&str>,
        role: bool,
        finish: Option<&str>,
        include_usage: bool,
    ) -> Value {
        let choice = match self.endpoint {
            Endpoint::Chat => {
                let mut delta = Map::new();
                if role {
                    delta.insert("role".into(), json!("assistant"));
                }
                if let Some(t) = text {
                    delta.insert("content".into(), json!(t));
                }
                json!({"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish})
            }
            Endpoint::Completion => json!({
                "index": 0,
                "text": text.unwrap_or(""),
                "logprobs": null,
                "finish_reason": finish,
            }),
        };
        let mut v = json!({
            "id": self.id,
            "object": self.object(true),
            "created": self.created,
            "model": self.model,
            "choices": [choice],
        });
        if include_usage {
            v["usage"] = Value::Null;
        }
        v
    }

    /// The chunk after the last choice chunk when `stream_options.include_usage` is set.
    pub fn usage_chunk(&self, usage: Usage) -> Value {
        json!({
            "id": self.id,
            "object": self.object(true),
            "created": self.created,
            "model": self.model,
            "choices": [],
            "usage": usage.json(),
        })
    }
}

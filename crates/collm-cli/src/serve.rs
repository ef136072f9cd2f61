//! `collm serve`: an OpenAI-compatible HTTP server for a trained team's agents (or one plain
//! model), on axum and tokio. Each agent has its own continuous-batching engine
//! ([`collm_model::batcher`]), so agents serve in parallel and concurrent requests to one agent
//! share its decode steps. Endpoints: `GET /v1/models`, `POST /v1/chat/completions`,
//! `POST /v1/completions` (streamed as server-sent events with `stream`), and collm's own
//! `GET /v1/stats` (each agent's decode steps by batch size).

use anyhow::{Context, Result};
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use collm_model::batcher::{Batcher, Event, Job};
use collm_model::{Message, SamplingParams, Tokenizer};
use serde_json::{json, Value};
use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

/// One served model: an agent of the team, or the plain model.
pub struct Served {
    pub name: String,
    pub tokenizer: Arc<Tokenizer>,
    /// Chat requests go through the chat template (else the messages' contents are joined, as a
    /// raw-format agent saw its history in training).
    pub chat_template: bool,
    pub context: usize,
    pub batcher: Batcher,
}

pub struct App {
    pub models: Vec<Served>,
    pub created: u64,
    requests: AtomicU64,
}

impl App {
    pub fn new(models: Vec<Served>) -> Self {
        let created = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
        Self { models, created, requests: AtomicU64::new(0) }
    }
}

/// An error in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}`.
struct ApiError {
    status: StatusCode,
    message: String,
    param: Option<&'static str>,
    code: Option<&'static str>,
}

fn bad(message: impl Into<String>, param: Option<&'static str>) -> ApiError {
    ApiError { status: StatusCode::BAD_REQUEST, message: message.into(), param, code: None }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let kind = if self.status.is_server_error() { "server_error" } else { "invalid_request_error" };
        let body = json!({"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}});
        (self.status, axum::Json(body)).into_response()
    }
}

pub fn router(app: Arc<App>) -> Router {
    Router::new()
        .route("/v1/models", get(models))
        .route("/v1/chat/completions", post(chat))
        .route("/v1/completions", post(completions))
        .route("/v1/stats", get(stats))
        .fallback(|| async {
            ApiError {
                status: StatusCode::NOT_FOUND,
                message: "no such endpoint (collm serves /v1/models, /v1/chat/completions, /v1/completions, /v1/stats)".into(),
                param: None,
                code: None,
            }
        })
        .with_state(app)
}

async fn models(State(app): State<Arc<App>>) -> Response {
    let data: Vec<Value> =
        app.models.iter().map(|m| json!({"id": m.name, "object": "model", "created": app.created, "owned_by": "collm"})).collect();
    axum::Json(json!({"object": "list", "data": data})).into_response()
}

async fn stats(State(app): State<Arc<App>>) -> Response {
    let per: serde_json::Map<String, Value> =
        app.models.iter().map(|m| (m.name.clone(), serde_json::to_value(m.batcher.stats()).unwrap_or(Value::Null))).collect();
    axum::Json(json!({"requests": app.requests.load(Ordering::Relaxed), "models": per})).into_response()
}

/// What a request asks for, checked.
struct Ask {
    model: usize,
    prompt: Vec<u32>,
    params: SamplingParams,
    n: usize,
    seed: u64,
    stop: Vec<String>,
    stream: bool,
    logprobs: bool,
    include_usage: bool,
}

fn parse_body(body: &[u8]) -> Result<serde_json::Map<String, Value>, ApiError> {
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(m)) => Ok(m),
        Ok(_) => Err(bad("the body must be a JSON object", None)),
        Err(e) => Err(bad(format!("the body is not valid JSON: {e}"), None)),
    }
}

fn number(m: &serde_json::Map<String, Value>, key: &'static str, lo: f64, hi: f64, default: f64) -> Result<f64, ApiError> {
    match m.get(key) {
        None | Some(Value::Null) => Ok(default),
        Some(v) => match v.as_f64() {
            Some(x) if x >= lo && x <= hi => Ok(x),
            _ => Err(bad(format!("'{key}' must be a number from {lo} to {hi}, got {v}"), Some(key))),
        },
    }
}

fn whole(m: &serde_json::Map<String, Value>, key: &'static str, lo: u64, hi: u64) -> Result<Option<u64>, ApiError> {
    match m.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => match v.as_u64() {
            Some(x) if x >= lo && x <= hi => Ok(Some(x)),
            _ => Err(bad(format!("'{key}' must be a whole number from {lo} to {hi}, got {v}"), Some(key))),
        },
    }
}

impl App {
    /// Checks the fields common to both endpoints; `prompt` renders the request's prompt text
    /// for the chosen model (and says whether to add the tokenizer's special tokens).
    fn ask(
        &self,
        m: &serde_json::Map<String, Value>,
        prompt: impl FnOnce(&Served) -> Result<(String, bool), ApiError>,
        default_max: usize,
        chat: bool,
    ) -> Result<Ask, ApiError> {
        let name = m.get("model").and_then(|v| v.as_str()).ok_or_else(|| bad("'model' is required (see GET /v1/models)", Some("model")))?;
        let model = self.models.iter().position(|s| s.name == name).ok_or_else(|| {
            let known: Vec<&str> = self.models.iter().map(|s| s.name.as_str()).collect();
            ApiError {
                status: StatusCode::BAD_REQUEST,
                message: format!("the model '{name}' does not exist here (served: {})", known.join(", ")),
                param: Some("model"),
                code: Some("model_not_found"),
            }
        })?;
        let s = &self.models[model];
        let (text, special) = prompt(s)?;
        let ids = s.tokenizer.encode(&text, special).map_err(|e| bad(format!("the prompt cannot be tokenized: {e:#}"), None))?;
        if ids.is_empty() {
            return Err(bad("the prompt is empty", Some(if chat { "messages" } else { "prompt" })));
        }
        if ids.len() >= s.context {
            return Err(ApiError {
                status: StatusCode::PAYLOAD_TOO_LARGE,
                message: format!(
                    "the prompt's {} tokens do not fit {}'s context of {} tokens (prompt and response together)",
                    ids.len(),
                    s.name,
                    s.context
                ),
                param: Some(if chat { "messages" } else { "prompt" }),
                code: Some("context_length_exceeded"),
            });
        }
        let room = s.context - ids.len();
        let max = whole(m, "max_completion_tokens", 1, u32::MAX as u64)?.or(whole(m, "max_tokens", 1, u32::MAX as u64)?);
        let max_new_tokens = max.map(|x| x as usize).unwrap_or(default_max).min(room);
        let temperature = number(m, "temperature", 0.0, 2.0, 1.0)?;
        let top_p = number(m, "top_p", 0.0, 1.0, 1.0)?;
        if top_p == 0.0 {
            return Err(bad("'top_p' must be above 0", Some("top_p")));
        }
        let n = whole(m, "n", 1, 16)?.unwrap_or(1) as usize;
        let seed = match m.get("seed") {
            None | Some(Value::Null) => self.requests.load(Ordering::Relaxed) ^ self.created,
            Some(v) => v
                .as_i64()
                .map(|x| x as u64)
                .or(v.as_u64())
                .ok_or_else(|| bad(format!("'seed' must be an integer, got {v}"), Some("seed")))?,
        };
        let stop = match m.get("stop") {
            None | Some(Value::Null) => vec![],
            Some(Value::String(s)) => vec![s.clone()],
            Some(Value::Array(a)) if a.len() <= 4 && a.iter().all(|x| x.as_str().is_some_and(|s| !s.is_empty())) => {
                a.iter().filter_map(|x| x.as_str().map(String::from)).collect()
            }
            Some(v) => return Err(bad(format!("'stop' must be a string or a list of up to 4 non-empty strings, got {v}"), Some("stop"))),
        };
        let stream = match m.get("stream") {
            None | Some(Value::Null) => false,
            Some(v) => v.as_bool().ok_or_else(|| bad("'stream' must be true or false", Some("stream")))?,
        };
        let logprobs = match m.get("logprobs") {
            None | Some(Value::Null) => false,
            Some(Value::Bool(b)) => *b,
            Some(v) if !chat && v.as_u64().is_some_and(|x| x <= 5) => true,
            Some(v) => {
                return Err(bad(
                    format!("'logprobs' must be {}, got {v}", if chat { "true or false" } else { "a number from 0 to 5" }),
                    Some("logprobs"),
                ))
            }
        };
        let include_usage = m.get("stream_options").and_then(|o| o.get("include_usage")).and_then(|v| v.as_bool()).unwrap_or(false);
        let params = SamplingParams { max_new_tokens, temperature, top_p, top_k: 0, greedy: temperature == 0.0 };
        Ok(Ask { model, prompt: ids, params, n, seed, stop, stream, logprobs, include_usage })
    }
}

fn messages(m: &serde_json::Map<String, Value>) -> Result<Vec<Message>, ApiError> {
    let list = m
        .get("messages")
        .and_then(|v| v.as_array())
        .ok_or_else(|| bad("'messages' must be a list of {role, content}", Some("messages")))?;
    if list.is_empty() {
        return Err(bad("'messages' is empty", Some("messages")));
    }
    list.iter()
        .enumerate()
        .map(|(i, msg)| {
            let role =
                msg.get("role").and_then(|v| v.as_str()).ok_or_else(|| bad(format!("messages[{i}] has no 'role'"), Some("messages")))?;
            // Content may be a string or a list of text parts.
            let content = match msg.get("content") {
                Some(Value::String(s)) => s.clone(),
                Some(Value::Array(parts)) => {
                    parts.iter().filter_map(|p| p.get("text").and_then(|t| t.as_str())).collect::<Vec<_>>().join("")
                }
                Some(Value::Null) | None => String::new(),
                Some(v) => return Err(bad(format!("messages[{i}].content must be a string, got {v}"), Some("messages"))),
            };
            Ok(Message { role: role.to_string(), content })
        })
        .collect()
}

/// One choice's text as its tokens come: decoded, cut at a stop string, with the part that could
/// still become a stop string held back while streaming.
struct ChoiceText {
    tokens: Vec<u32>,
    logprobs: Vec<f32>,
    text: String,
    sent: usize,
    finish: Option<&'static str>,
}

impl ChoiceText {
    fn new() -> Self {
        Self { tokens: vec![], logprobs: vec![], text: String::new(), sent: 0, finish: None }
    }

    /// Takes a token (not a stop token); returns true when a stop string ended the choice.
    fn push(&mut self, tok: &Tokenizer, token: u32, logprob: f32, stop: &[String]) -> bool {
        self.tokens.push(token);
        self.logprobs.push(logprob);
        self.text = tok.decode(&self.tokens, false).unwrap_or_default();
        for s in stop {
            if let Some(p) = self.text.find(s.as_str()) {
                self.text.truncate(p);
                self.finish = Some("stop");
                return true;
            }
        }
        false
    }

    /// The text that can be sent now (all of it once finished).
    fn ready(&mut self, stop: &[String]) -> String {
        let mut end = self.text.len();
        if self.finish.is_none() {
            // Hold back an unfinished character and any tail that begins a stop string.
            if self.text.ends_with('\u{FFFD}') {
                end = self.text.trim_end_matches('\u{FFFD}').len();
            }
            for s in stop {
                for k in (1..s.len()).rev() {
                    if s.is_char_boundary(k) && self.text[..end].ends_with(&s[..k]) {
                        end = end.min(end - k);
                        break;
                    }
                }
            }
        }
        if end <= self.sent || !self.text.is_char_boundary(end) || !self.text.is_char_boundary(self.sent) {
            return String::new();
        }
        let out = self.text[self.sent..end].to_string();
        self.sent = end;
        out
    }
}

/// A running request: its engine events, and per choice a flag that drops the row.
struct Running {
    events: tokio::sync::mpsc::UnboundedReceiver<Event>,
    cancel: Arc<Vec<AtomicBool>>,
}

fn start(app: &App, ask: &Ask) -> Result<Running, ApiError> {
    let (tx, events) = tokio::sync::mpsc::unbounded_channel();
    let cancel: Arc<Vec<AtomicBool>> = Arc::new((0..ask.n).map(|_| AtomicBool::new(false)).collect());
    let c = cancel.clone();
    let sink = Box::new(move |e: Event| {
        let choice = match &e {
            Event::Token { choice, .. } | Event::Done { choice, .. } => Some(*choice),
            Event::Error(_) => None,
        };
        if choice.is_some_and(|i| c[i].load(Ordering::Relaxed)) {
            return false;
        }
        tx.send(e).is_ok()
    });
    let s = &app.models[ask.model];
    let job = Job {
        prompt: ask.prompt.clone(),
        params: ask.params.clone(),
        n: ask.n,
        seed: ask.seed,
        stop_ids: s.tokenizer.stop_ids.clone(),
        sink,
    };
    s.batcher.submit(job).map_err(|e| ApiError {
        status: StatusCode::SERVICE_UNAVAILABLE,
        message: format!("{e:#}"),
        param: None,
        code: None,
    })?;
    app.requests.fetch_add(1, Ordering::Relaxed);
    Ok(Running { events, cancel })
}

/// Applies an engine event to the choices; returns the choice it touched and whether it ended.
fn apply(e: Event, choices: &mut [ChoiceText], tok: &Tokenizer, stop: &[String], cancel: &[AtomicBool]) -> Result<Option<usize>, String> {
    match e {
        Event::Token { choice, token, logprob } => {
            let c = &mut choices[choice];
            if c.finish.is_some() {
                return Ok(None);
            }
            if tok.stop_ids.contains(&token) {
                return Ok(Some(choice));
            }
            if c.push(tok, token, logprob, stop) {
                cancel[choice].store(true, Ordering::Relaxed);
            }
            Ok(Some(choice))
        }
        Event::Done { choice, stopped } => {
            let c = &mut choices[choice];
            if c.finish.is_none() {
                c.finish = Some(if stopped { "stop" } else { "length" });
            }
            Ok(Some(choice))
        }
        Event::Error(e) => Err(e),
    }
}

fn usage(prompt: usize, choices: &[ChoiceText]) -> Value {
    let completion: usize = choices.iter().map(|c| c.tokens.len()).sum();
    json!({"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion})
}

async fn chat(State(app): State<Arc<App>>, body: axum::body::Bytes) -> Response {
    match chat_inner(app, &body).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    }
}

async fn completions(State(app): State<Arc<App>>, body: axum::body::Bytes) -> Response {
    match completions_inner(app, &body).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    }
}

async fn chat_inner(app: Arc<App>, body: &[u8]) -> Result<Response, ApiError> {
    let m = parse_body(body)?;
    let msgs = messages(&m)?;
    let ask = app.ask(
        &m,
        |s| {
            if s.chat_template {
                let text = s
                    .tokenizer
                    .apply_chat_template(&msgs, true)
                    .map_err(|e| bad(format!("the chat template failed: {e:#}"), Some("messages")))?;
                Ok((text, false))
            } else {
                Ok((msgs.iter().map(|x| x.content.as_str()).collect::<Vec<_>>().join(""), true))
            }
        },
        256,
        true,
    )?;
    serve(app, ask, true).await
}

async fn completions_inner(app: Arc<App>, body: &[u8]) -> Result<Response, ApiError> {
    let m = parse_body(body)?;
    let prompt = match m.get("prompt") {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Array(a)) if a.len() == 1 && a[0].is_string() => a[0].as_str().unwrap_or_default().to_string(),
        Some(v) => return Err(bad(format!("'prompt' must be a string (or a list of one), got {v}"), Some("prompt"))),
        None => return Err(bad("'prompt' is required", Some("prompt"))),
    };
    let ask = app.ask(&m, |_| Ok((prompt, true)), 16, false)?;
    serve(app, ask, false).await
}

/// The log-probs of `tokens` in OpenAI's shape (chat's `content` list, or completions' lists).
fn logprobs_json(tok: &Tokenizer, tokens: &[u32], logprobs: &[f32], chat: bool) -> Value {
    let pieces: Vec<String> = tokens.iter().map(|&t| tok.decode(&[t], false).unwrap_or_default()).collect();
    if chat {
        let content: Vec<Value> = pieces
            .iter()
            .zip(logprobs)
            .map(|(p, lp)| json!({"token": p, "logprob": lp, "bytes": p.as_bytes(), "top_logprobs": []}))
            .collect();
        json!({"content": content})
    } else {
        let mut offset = 0;
        let offsets: Vec<usize> = pieces
            .iter()
            .map(|p| {
                let o = offset;
                offset += p.len();
                o
            })
            .collect();
        json!({"tokens": pieces, "token_logprobs": logprobs, "top_logprobs": null, "text_offset": offsets})
    }
}

async fn serve(app: Arc<App>, ask: Ask, chat: bool) -> Result<Response, ApiError> {
    let mut run = start(&app, &ask)?;
    let id = format!("{}-{:x}{:04x}", if chat { "chatcmpl" } else { "cmpl" }, app.created, app.requests.load(Ordering::Relaxed));
    let name = app.models[ask.model].name.clone();
    let created = app.created;
    let prompt_tokens = ask.prompt.len();
    if !ask.stream {
        let tok = app.models[ask.model].tokenizer.clone();
        let mut choices: Vec<ChoiceText> = (0..ask.n).map(|_| ChoiceText::new()).collect();
        while choices.iter().any(|c| c.finish.is_none()) {
            let Some(e) = run.events.recv().await else { break };
            apply(e, &mut choices, &tok, &ask.stop, &run.cancel).map_err(|e| ApiError {
                status: StatusCode::INTERNAL_SERVER_ERROR,
                message: e,
                param: None,
                code: None,
            })?;
        }
        let out: Vec<Value> = choices
            .iter()
            .enumerate()
            .map(|(i, c)| {
                let lp = if ask.logprobs { logprobs_json(&tok, &c.tokens, &c.logprobs, chat) } else { Value::Null };
                if chat {
                    json!({"index": i, "message": {"role": "assistant", "content": c.text}, "logprobs": lp, "finish_reason": c.finish})
                } else {
                    json!({"index": i, "text": c.text, "logprobs": lp, "finish_reason": c.finish})
                }
            })
            .collect();
        let object = if chat { "chat.completion" } else { "text_completion" };
        let body =
            json!({"id": id, "object": object, "created": created, "model": name, "choices": out, "usage": usage(prompt_tokens, &choices)});
        return Ok(axum::Json(body).into_response());
    }
    // Streamed: one chunk per piece of text, then each choice's finish, then [DONE].
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<SseEvent, Infallible>>(64);
    let tok = app.models[ask.model].tokenizer.clone();
    tokio::spawn(async move {
        let object = if chat { "chat.completion.chunk" } else { "text_completion" };
        let chunk = |choice: Value| json!({"id": id, "object": object, "created": created, "model": name, "choices": [choice]});
        let send = |v: Value| {
            let tx = tx.clone();
            async move { tx.send(Ok(SseEvent::default().data(v.to_string()))).await.is_ok() }
        };
        let mut choices: Vec<ChoiceText> = (0..ask.n).map(|_| ChoiceText::new()).collect();
        if chat {
            for i in 0..ask.n {
                if !send(chunk(json!({"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": null, "finish_reason": null})))
                    .await
                {
                    return;
                }
            }
        }
        let mut lp_sent = vec![0usize; ask.n];
        while choices.iter().any(|c| c.finish.is_none()) {
            let Some(e) = run.events.recv().await else { break };
            let touched = match apply(e, &mut choices, &tok, &ask.stop, &run.cancel) {
                Ok(t) => t,
                Err(msg) => {
                    let _ = send(json!({"error": {"message": msg, "type": "server_error", "param": null, "code": null}})).await;
                    return;
                }
            };
            let Some(i) = touched else { continue };
            let piece = choices[i].ready(&ask.stop);
            let finish = choices[i].finish;
            if !piece.is_empty() || finish.is_some() {
                let lp = if ask.logprobs {
                    let c = &choices[i];
                    let from = std::mem::replace(&mut lp_sent[i], c.tokens.len());
                    logprobs_json(&tok, &c.tokens[from..], &c.logprobs[from..], chat)
                } else {
                    Value::Null
                };
                let v = if chat {
                    let delta = if piece.is_empty() { json!({}) } else { json!({"content": piece}) };
                    json!({"index": i, "delta": delta, "logprobs": lp, "finish_reason": finish})
                } else {
                    json!({"index": i, "text": piece, "logprobs": lp, "finish_reason": finish})
                };
                if !send(chunk(v)).await {
                    // The client went away: drop its rows.
                    run.cancel.iter().for_each(|c| c.store(true, Ordering::Relaxed));
                    return;
                }
            }
        }
        if ask.include_usage {
            let mut v = json!({"id": id, "object": object, "created": created, "model": name, "choices": []});
            v["usage"] = usage(prompt_tokens, &choices);
            let _ = send(v).await;
        }
        let _ = tx.send(Ok(SseEvent::default().data("[DONE]"))).await;
    });
    Ok(Sse::new(tokio_stream::wrappers::ReceiverStream::new(rx)).keep_alive(KeepAlive::default()).into_response())
}

/// Serves on 127.0.0.1 (any free port) from a background thread for the rest of the process
/// (`collm bench serve`); returns the address.
pub fn spawn(models: Vec<Served>) -> Result<std::net::SocketAddr> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let rt = match tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build() {
            Ok(rt) => rt,
            Err(e) => {
                let _ = tx.send(Err(anyhow::anyhow!("starting the tokio runtime: {e}")));
                return;
            }
        };
        rt.block_on(async move {
            let listener = match tokio::net::TcpListener::bind(("127.0.0.1", 0)).await {
                Ok(l) => l,
                Err(e) => {
                    let _ = tx.send(Err(anyhow::anyhow!("binding 127.0.0.1: {e}")));
                    return;
                }
            };
            let _ = tx.send(listener.local_addr().map_err(anyhow::Error::from));
            let _ = axum::serve(listener, router(Arc::new(App::new(models)))).await;
        });
    });
    rx.recv().context("the server thread ended")?
}

/// Serves until Ctrl-C or SIGTERM, then drains the requests in flight. Prints one JSON line
/// with the address and the models once listening.
pub fn run(models: Vec<Served>, host: &str, port: u16) -> Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().context("starting the tokio runtime")?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind((host, port)).await.with_context(|| format!("binding {host}:{port}"))?;
        let addr = listener.local_addr()?;
        let names: Vec<String> = models.iter().map(|m| m.name.clone()).collect();
        println!("{}", json!({"listening": format!("http://{addr}"), "models": names}));
        use std::io::Write;
        std::io::stdout().flush()?;
        eprintln!("collm: serving {} on http://{addr}/v1 (Ctrl-C drains the requests in flight and stops)", names.join(", "));
        let app = Arc::new(App::new(models));
        let shutdown = async {
            let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {},
                _ = async { match term.as_mut() { Some(t) => { t.recv().await; } None => std::future::pending::<()>().await } } => {},
            }
            eprintln!("collm: stopping: finishing the requests in flight");
        };
        axum::serve(listener, router(app)).with_graceful_shutdown(shutdown).await.context("serving")?;
        eprintln!("collm: stopped");
        Ok(())
    })
}

//! `collm serve` on loopback, through the real binary: every endpoint in OpenAI's shapes,
//! streaming that reassembles to the non-streamed text, concurrent requests batched and each
//! answered as it is alone, stop strings, log-probs, errors with their status and shape, the
//! official `openai` Python client, and Ctrl-C draining a request in flight.

use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};

fn collm() -> Command {
    Command::new(env!("CARGO_BIN_EXE_collm"))
}

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("collm-serve-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A server process, killed when dropped.
struct Server {
    child: Child,
    addr: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start(args: &[&str]) -> Server {
    let mut child = collm().arg("serve").args(args).args(["--port", "0"]).stdout(Stdio::piped()).stderr(Stdio::null()).spawn().unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
    let v: Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line:?}"));
    let addr = v["listening"].as_str().unwrap().trim_start_matches("http://").to_string();
    Server { child, addr }
}

/// A trained tiny team of two raw-format agents (byte-level vocabulary).
fn team(d: &std::path::Path) -> PathBuf {
    let config = d.join("team.toml");
    std::fs::write(
        &config,
        "seed = 5\nalgo = \"cc\"\nsteps = 1\nbuffer = 2\neval_every = 0\ncheckpoint_every = 1\n[task]\nname = \"summary\"\n\
         [agents]\nmodel = \"tiny\"\nformat = \"raw\"\n[agents.tiny]\nvocab = \"bytes\"\nhidden = 16\nlayers = 1\nheads = 2\nkv_heads = 1\nintermediate = 32\n\
         [sampling]\nmax_new_tokens = 8\n",
    )
    .unwrap();
    let run = d.join("run");
    let out = collm().args(["train", "--config"]).arg(&config).arg("--out").arg(&run).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    run
}

/// A plain HTTP/1.1 exchange: (status, body), with chunked bodies decoded.
fn http(addr: &str, method: &str, path: &str, body: &str) -> (u16, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    write!(s, "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len())
        .unwrap();
    let mut raw = vec![];
    s.read_to_end(&mut raw).unwrap();
    let text = String::from_utf8_lossy(&raw).to_string();
    let (head, rest) = text.split_once("\r\n\r\n").unwrap();
    let status: u16 = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    let body = if head.to_ascii_lowercase().contains("transfer-encoding: chunked") {
        let mut out = String::new();
        let mut r = rest;
        loop {
            let (size, tail) = r.split_once("\r\n").unwrap();
            let n = usize::from_str_radix(size.trim(), 16).unwrap();
            if n == 0 {
                break;
            }
            out.push_str(&tail[..n]);
            r = &tail[n + 2..];
        }
        out
    } else {
        rest.to_string()
    };
    (status, body)
}

fn post(addr: &str, path: &str, body: &Value) -> (u16, Value) {
    let (status, text) = http(addr, "POST", path, &body.to_string());
    (status, serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}")))
}

/// The data lines of a server-sent event stream, up to [DONE] (which must end it).
fn events(text: &str) -> Vec<Value> {
    let data: Vec<&str> = text.lines().filter_map(|l| l.strip_prefix("data: ")).collect();
    assert_eq!(data.last(), Some(&"[DONE]"), "{text}");
    data[..data.len() - 1].iter().map(|d| serde_json::from_str(d).unwrap()).collect()
}

/// Reassembles streamed choices: (text per index, finish reason per index).
fn reassemble(chunks: &[Value], chat: bool) -> (Vec<String>, Vec<Value>) {
    let mut text = vec![String::new(); 4];
    let mut finish = vec![Value::Null; 4];
    for c in chunks {
        for ch in c["choices"].as_array().unwrap() {
            let i = ch["index"].as_u64().unwrap() as usize;
            let piece = if chat { ch["delta"]["content"].as_str() } else { ch["text"].as_str() };
            text[i].push_str(piece.unwrap_or(""));
            if !ch["finish_reason"].is_null() {
                finish[i] = ch["finish_reason"].clone();
            }
        }
    }
    (text, finish)
}

#[test]
fn serve_answers_like_openai() {
    let d = tmp("api");
    let run = team(&d);
    let srv = start(&["--checkpoint", run.to_str().unwrap(), "--max-batch", "16"]);
    let a = srv.addr.as_str();

    let (status, models) = http(a, "GET", "/v1/models", "");
    let models: Value = serde_json::from_str(&models).unwrap();
    assert_eq!(status, 200);
    assert_eq!(models["object"], "list");
    let ids: Vec<&str> = models["data"].as_array().unwrap().iter().map(|m| m["id"].as_str().unwrap()).collect();
    assert_eq!(ids, ["agent-0", "agent-1"]);

    // Completions: streamed chunks reassemble to the non-streamed text for the same seed.
    let req = json!({"model": "agent-0", "prompt": "Summarize: the bees", "max_tokens": 24, "temperature": 0.8, "seed": 11, "logprobs": 1});
    let (status, full) = post(a, "/v1/completions", &req);
    assert_eq!(status, 200, "{full}");
    assert_eq!(full["object"], "text_completion");
    let text = full["choices"][0]["text"].as_str().unwrap().to_string();
    assert_eq!(full["choices"][0]["finish_reason"], "length");
    assert_eq!(full["usage"]["completion_tokens"], 24);
    assert_eq!(full["usage"]["total_tokens"], full["usage"]["prompt_tokens"].as_u64().unwrap() + 24);
    assert_eq!(full["choices"][0]["logprobs"]["token_logprobs"].as_array().unwrap().len(), 24);
    let mut sreq = req.clone();
    sreq["stream"] = json!(true);
    let (status, body) = http(a, "POST", "/v1/completions", &sreq.to_string());
    assert_eq!(status, 200);
    let (st, fin) = reassemble(&events(&body), false);
    assert_eq!((st[0].as_str(), &fin[0]), (text.as_str(), &json!("length")));

    // Chat with n = 2 on the other agent, streamed and not.
    let chat = json!({"model": "agent-1", "messages": [{"role": "user", "content": "Write a detailed summary."}], "n": 2, "max_tokens": 16, "seed": 3, "stream_options": {"include_usage": true}});
    let (status, full) = post(a, "/v1/chat/completions", &chat);
    assert_eq!(status, 200, "{full}");
    assert_eq!(full["object"], "chat.completion");
    let texts: Vec<String> = (0..2).map(|i| full["choices"][i]["message"]["content"].as_str().unwrap().to_string()).collect();
    assert_eq!(full["choices"][1]["message"]["role"], "assistant");
    assert_ne!(texts[0], texts[1], "two choices sampled alike");
    let mut schat = chat.clone();
    schat["stream"] = json!(true);
    let (_, body) = http(a, "POST", "/v1/chat/completions", &schat.to_string());
    let chunks = events(&body);
    assert!(chunks.iter().all(|c| c["object"] == "chat.completion.chunk"));
    assert_eq!(chunks.last().unwrap()["usage"], full["usage"]);
    let (st, _) = reassemble(&chunks, true);
    assert_eq!(&st[..2], &texts[..]);

    // A stop string cuts the text where it first appears, streamed or not.
    let greedy = json!({"model": "agent-0", "prompt": "Summarize: the bees", "max_tokens": 32, "temperature": 0});
    let (_, g) = post(a, "/v1/completions", &greedy);
    let gtext = g["choices"][0]["text"].as_str().unwrap().to_string();
    let cut = gtext.char_indices().nth(10).map(|(i, _)| i).unwrap();
    let stop: String = gtext[cut..].chars().take(2).collect();
    let want = &gtext[..gtext.find(&stop).unwrap()];
    let mut sg = greedy.clone();
    sg["stop"] = json!([stop]);
    let (_, stopped) = post(a, "/v1/completions", &sg);
    assert_eq!((stopped["choices"][0]["text"].as_str().unwrap(), &stopped["choices"][0]["finish_reason"]), (want, &json!("stop")));
    sg["stream"] = json!(true);
    let (_, body) = http(a, "POST", "/v1/completions", &sg.to_string());
    let (st, fin) = reassemble(&events(&body), false);
    assert_eq!((st[0].as_str(), &fin[0]), (want, &json!("stop")));

    // 16 concurrent requests: each gets what it gets alone, and decode steps ran batched.
    let reqs: Vec<Value> = (0..16)
        .map(|i| json!({"model": "agent-0", "prompt": format!("Request {i}: {}", "x".repeat(i)), "max_tokens": 20 + i, "temperature": 0.9, "seed": 100 + i}))
        .collect();
    let alone: Vec<String> =
        reqs.iter().map(|r| post(a, "/v1/completions", r).1["choices"][0]["text"].as_str().unwrap().to_string()).collect();
    let before = serde_json::from_str::<Value>(&http(a, "GET", "/v1/stats", "").1).unwrap();
    let together: Vec<String> = std::thread::scope(|s| {
        let hs: Vec<_> = reqs
            .iter()
            .map(|r| s.spawn(move || post(a, "/v1/completions", r).1["choices"][0]["text"].as_str().unwrap().to_string()))
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert_eq!(together, alone);
    let stats = serde_json::from_str::<Value>(&http(a, "GET", "/v1/stats", "").1).unwrap();
    // Decode steps agent-0 ran with more than one row.
    let batched_steps = |stats: &Value| -> u64 {
        let by_batch = stats["models"]["agent-0"]["steps_by_batch"].as_object().unwrap();
        by_batch.iter().filter(|(k, _)| k.parse::<usize>().unwrap() > 1).map(|(_, v)| v.as_u64().unwrap()).sum()
    };
    let (batched, batched_before) = (batched_steps(&stats), batched_steps(&before));
    assert!(batched > batched_before, "no decode step ran more than one row: {stats}");
    assert!(stats["models"]["agent-0"]["max_batch"].as_u64().unwrap() > 1, "{stats}");

    // Errors: OpenAI's shape and status.
    let shape = |status: u16, body: &str, want_status: u16, param: Option<&str>| {
        assert_eq!(status, want_status, "{body}");
        let v: Value = serde_json::from_str(body).unwrap();
        assert!(v["error"]["message"].as_str().is_some_and(|m| !m.is_empty()) && v["error"]["type"].is_string(), "{v}");
        if let Some(p) = param {
            assert_eq!(v["error"]["param"], p, "{v}");
        }
    };
    let (s, b) = http(a, "POST", "/v1/completions", "{not json");
    shape(s, &b, 400, None);
    let (s, b) = http(a, "POST", "/v1/completions", &json!({"model": "agent-7", "prompt": "hi"}).to_string());
    shape(s, &b, 400, Some("model"));
    assert!(b.contains("model_not_found") && b.contains("agent-0"), "{b}");
    let (s, b) = http(a, "POST", "/v1/completions", &json!({"model": "agent-0", "prompt": "x".repeat(70_000)}).to_string());
    shape(s, &b, 413, Some("prompt"));
    assert!(b.contains("context_length_exceeded"), "{b}");
    for (field, value) in
        [("max_tokens", json!(0)), ("temperature", json!(9)), ("n", json!(0)), ("stop", json!(3)), ("stream", json!("yes"))]
    {
        let mut r = json!({"model": "agent-0", "prompt": "hi"});
        r[field] = value;
        let (s, b) = http(a, "POST", "/v1/completions", &r.to_string());
        shape(s, &b, 400, Some(field));
    }
    let (s, b) = http(a, "POST", "/v1/chat/completions", &json!({"model": "agent-0", "messages": "hi"}).to_string());
    shape(s, &b, 400, Some("messages"));
    let (s, b) = http(a, "GET", "/v1/nothing", "");
    shape(s, &b, 404, None);
    drop(srv);
}

/// The official `openai` client (from PyPI) completes a chat, streamed and not, against a plain
/// SmolLM2 served through its chat template.
#[test]
fn the_openai_python_client_completes_a_chat() {
    let d = tmp("openai");
    let deps = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("pydeps");
    let has = |p: &std::path::Path| {
        Command::new("python3").arg("-c").arg("import openai").env("PYTHONPATH", p).output().is_ok_and(|o| o.status.success())
    };
    if !has(&deps) {
        let out =
            Command::new("python3").args(["-m", "pip", "install", "--quiet", "--target"]).arg(&deps).arg("openai==1.*").output().unwrap();
        assert!(out.status.success(), "installing the openai client from PyPI: {}", String::from_utf8_lossy(&out.stderr));
    }
    let srv = start(&["--model", "smollm2-135m"]);
    let script = d.join("client.py");
    std::fs::write(
        &script,
        format!(
            "from openai import OpenAI\nc = OpenAI(base_url='http://{}/v1', api_key='none')\n\
             ids = [m.id for m in c.models.list().data]\nassert ids == ['smollm2-135m'], ids\n\
             r = c.chat.completions.create(model='smollm2-135m', messages=[{{'role': 'user', 'content': 'Say hello.'}}], max_tokens=8, temperature=0, seed=1)\n\
             text = r.choices[0].message.content\nassert isinstance(text, str) and text, r\nassert r.usage.completion_tokens >= 1, r.usage\n\
             s = c.chat.completions.create(model='smollm2-135m', messages=[{{'role': 'user', 'content': 'Say hello.'}}], max_tokens=8, temperature=0, seed=1, stream=True)\n\
             streamed = ''.join(ch.choices[0].delta.content or '' for ch in s if ch.choices)\nassert streamed == text, (streamed, text)\n\
             try:\n    c.chat.completions.create(model='nope', messages=[{{'role': 'user', 'content': 'x'}}])\n    raise SystemExit('no error')\nexcept Exception as e:\n    assert 'nope' in str(e), e\n\
             print('ok', repr(text))\n",
            srv.addr
        ),
    )
    .unwrap();
    let out = Command::new("python3").arg(&script).env("PYTHONPATH", &deps).output().unwrap();
    assert!(out.status.success(), "{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("ok"));
}

/// Ctrl-C lets a request in flight finish (the stream reaches [DONE]) and then exits cleanly.
#[test]
fn ctrl_c_drains_requests_in_flight() {
    let d = tmp("drain");
    let run = team(&d);
    let mut srv = start(&["--checkpoint", run.to_str().unwrap()]);
    let mut s = TcpStream::connect(&srv.addr).unwrap();
    let body = json!({"model": "agent-0", "prompt": "go", "max_tokens": 4000, "temperature": 0, "stream": true}).to_string();
    write!(s, "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len()).unwrap();
    let mut r = BufReader::new(s);
    let mut first = String::new();
    while !first.starts_with("data: ") && !first.contains("data: ") {
        first.clear();
        r.read_line(&mut first).unwrap();
    }
    unsafe { libc_kill(srv.child.id() as i32, 2) };
    let mut rest = String::new();
    r.read_to_string(&mut rest).unwrap();
    assert!(rest.contains("data: [DONE]"), "the stream was cut: {}", &rest[rest.len().saturating_sub(300)..]);
    let (_, fin) = reassemble(
        &events(&format!("{first}{rest}").replace("\r\n", "\n").lines().filter(|l| l.starts_with("data: ")).collect::<Vec<_>>().join("\n")),
        false,
    );
    // Greedy, this prompt runs to max_tokens: thousands of chunks came after the signal.
    assert_eq!(fin[0], "length");
    assert!(rest.matches("data: ").count() > 1000, "{}", rest.matches("data: ").count());
    let status = srv.child.wait().unwrap();
    assert!(status.success(), "{status}");
}

extern "C" {
    #[link_name = "kill"]
    fn libc_kill(pid: i32, sig: i32) -> i32;
}

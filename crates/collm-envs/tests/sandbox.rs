//! Containment tests of the sandbox: each hostile program is stopped or refused, the caller goes
//! on, and the result says what happened. Where the kernel's layers should hold on their own,
//! the same program also runs without the Python audit hook.

use collm_envs::sandbox::{Limits, RunResult, Sandbox, Status};
use std::time::{Duration, Instant};

fn sandbox(guard: bool) -> Sandbox {
    let limits = Limits { timeout: Duration::from_secs(3), memory_mb: 512, python_guard: guard, ..Limits::default() };
    Sandbox::new(limits, None).expect("a python3 for the sandbox")
}

fn run(sb: &Sandbox, code: &str) -> RunResult {
    let r = sb.run_code(code).expect("the sandbox itself must not fail");
    eprintln!("{code:?} -> {:?} {:?}\nstdout: {:.300}\nstderr: {:.600}", r.status, r.reason, r.stdout, r.stderr);
    r
}

#[test]
fn runs_code_and_reports_its_output_and_errors() {
    let sb = sandbox(true);
    let r = run(&sb, "import math\nprint(math.factorial(10))");
    assert_eq!(r.status, Status::Ok);
    assert_eq!(r.stdout.trim(), "3628800");
    assert_eq!(r.exit_code, Some(0));
    let r = run(&sb, "def f(:\n  pass");
    assert_eq!(r.status, Status::Error);
    assert!(r.stderr.contains("SyntaxError"), "{}", r.stderr);
    let r = run(&sb, "raise ValueError('boom')");
    assert_eq!(r.status, Status::Error);
    assert_eq!(r.reason.as_deref(), Some("ValueError: boom"));
    // Writing inside its own directory is fine.
    let r = run(&sb, "open('x.txt','w').write('hi')\nprint(open('x.txt').read())");
    assert_eq!((r.status, r.stdout.trim()), (Status::Ok, "hi"));
    // A clean environment: none of the caller's variables.
    std::env::set_var("COLLM_SECRET_TEST_VAR", "leak");
    let r = run(&sb, "import os\nprint(sorted(k for k in os.environ if 'SECRET' in k))");
    assert_eq!(r.stdout.trim(), "[]");
}

#[test]
fn infinite_loop_is_stopped_by_the_timeout() {
    for guard in [true, false] {
        let sb = sandbox(guard);
        let t = Instant::now();
        let r = run(&sb, "while True:\n    try:\n        pass\n    except BaseException:\n        pass");
        assert_eq!(r.status, Status::Timeout);
        assert!(t.elapsed() < Duration::from_secs(8), "took {:?}", t.elapsed());
        assert!(r.wall_s >= 2.9, "{}", r.wall_s);
    }
}

#[test]
fn fork_bomb_is_refused_and_cleaned_up() {
    let bomb = "import os\nwhile True:\n    os.fork()";
    let r = run(&sandbox(true), bomb);
    assert_eq!(r.status, Status::Error);
    assert!(r.stderr.contains("collm sandbox: os.fork is not allowed"), "{}", r.stderr);
    // Without the audit hook the kernel's process cap stops it (only with a throwaway uid).
    let sb = sandbox(false);
    if sb.isolation.own_uid {
        let r = run(&sb, "import os, time\nn = 0\ntry:\n    while True:\n        if os.fork() == 0:\n            time.sleep(30)\n        n += 1\nexcept OSError as e:\n    print('stopped after', n, type(e).__name__)");
        assert_eq!(r.status, Status::Ok);
        assert!(r.stdout.starts_with("stopped after"), "{}", r.stdout);
        let n: usize = r.stdout.split_whitespace().nth(2).unwrap().parse().unwrap();
        assert!(n < 64, "{n} processes");
    }
}

#[test]
fn huge_allocation_is_a_memory_error() {
    for guard in [true, false] {
        let r = run(&sandbox(guard), "x = bytearray(10 * 1024**3)\nprint(len(x))");
        assert_eq!(r.status, Status::Memory);
        assert!(r.stdout.is_empty());
    }
}

#[test]
fn writing_or_deleting_outside_its_directory_is_refused() {
    let outside = std::env::temp_dir().join(format!("collm-sandbox-victim-{}", std::process::id()));
    std::fs::create_dir_all(&outside).unwrap();
    let victim = outside.join("keep.txt");
    std::fs::write(&victim, "precious").unwrap();
    let target = outside.join("new.txt");
    let sb = sandbox(true);
    let r = run(&sb, &format!("open({:?}, 'w').write('x')", target.to_str().unwrap()));
    assert_eq!(r.status, Status::Error);
    assert!(r.stderr.contains("PermissionError"), "{}", r.stderr);
    let r = run(&sb, &format!("import os\nos.remove({:?})", victim.to_str().unwrap()));
    assert_eq!(r.status, Status::Error);
    let r = run(&sb, &format!("import shutil\nshutil.rmtree({:?})", outside.to_str().unwrap()));
    assert_eq!(r.status, Status::Error);
    let r = run(&sb, "open('../escape.txt', 'w').write('x')");
    assert_eq!(r.status, Status::Error);
    // Without the hook, a throwaway uid cannot touch a directory it does not own.
    let sb = sandbox(false);
    if sb.isolation.own_uid {
        let r = run(&sb, &format!("import os\nos.remove({:?})", victim.to_str().unwrap()));
        assert_eq!(r.status, Status::Error);
        assert!(r.stderr.contains("PermissionError"), "{}", r.stderr);
        let r = run(&sb, &format!("open({:?}, 'w').write('x')", target.to_str().unwrap()));
        assert_eq!(r.status, Status::Error);
    }
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious");
    assert!(!target.exists());
    std::fs::remove_dir_all(&outside).unwrap();
}

#[test]
fn sockets_are_refused() {
    let code = "import socket\ns = socket.socket(socket.AF_INET, socket.SOCK_STREAM)\ns.settimeout(2)\ns.connect(('1.1.1.1', 80))\nprint('connected')";
    let r = run(&sandbox(true), code);
    assert_eq!(r.status, Status::Error);
    assert!(r.stderr.contains("collm sandbox: socket"), "{}", r.stderr);
    // Without the hook: a new network namespace has no route anywhere.
    let sb = sandbox(false);
    if sb.isolation.network_namespace {
        let r = run(&sb, code);
        assert_eq!(r.status, Status::Error);
        assert!(r.stderr.contains("OSError") || r.stderr.contains("unreachable"), "{}", r.stderr);
        assert!(!r.stdout.contains("connected"));
    }
}

#[test]
fn printing_a_gigabyte_is_cut_off() {
    for guard in [true, false] {
        let t = Instant::now();
        let r = run(&sandbox(guard), "import sys\nchunk = 'x' * (1 << 20)\nfor _ in range(1024):\n    sys.stdout.write(chunk)");
        assert_eq!(r.status, Status::Error);
        assert!(r.output_truncated);
        assert_eq!(r.stdout.len(), 1 << 20);
        assert!(t.elapsed() < Duration::from_secs(3), "took {:?}", t.elapsed());
    }
}

#[test]
fn many_runs_in_parallel_each_in_its_own_directory() {
    let sb = sandbox(true);
    let results: Vec<RunResult> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..8)
            .map(|i| {
                let sb = &sb;
                s.spawn(move || {
                    sb.run_code(&format!("import os\nopen('f','w').write('{i}')\nprint(open('f').read(), len(os.listdir('.')))")).unwrap()
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (i, r) in results.iter().enumerate() {
        assert_eq!(r.status, Status::Ok, "{}", r.stderr);
        // Its own file, the program and the guard: nothing from the other runs.
        assert_eq!(r.stdout.trim(), format!("{i} 3"));
    }
}

//! The sandbox under load: 64 hostile programs at once (endless loops, fork bombs, allocations,
//! output floods, file escapes, sockets, orphaned sleepers), with and without the Python audit
//! hook, while a coding task scores joint actions. Every hostile run is contained, the task's
//! rewards are the ones it gives on a quiet machine, and afterwards no process, temporary
//! directory or file is left behind. (Its own test binary: nothing else runs in the sandbox then.)

use collm_envs::coding::{Coding, CodingTask};
use collm_envs::sandbox::{Limits, Sandbox, Status};
use collm_envs::{Env, Split};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A joint action for every sample problem: a correct one, a wrong one and one that does not
/// parse, so the rewards differ.
fn joint_actions(env: &Coding) -> Vec<(usize, Vec<Vec<String>>)> {
    let solutions = [
        "def sum_of_squares(numbers):\n    return sum(x * x for x in numbers)\n",
        "def count_vowels(text):\n    return sum(c in 'aeiouAEIOU' for c in text)\n",
        "def second_largest(values):\n    v = sorted(set(values))\n    return v[-2] if len(v) > 1 else None\n",
        "def is_palindrome_sentence(text):\n    return True\n",
        "def running_max(values):\n    return values\n",
        "def f(:\n",
    ];
    let aux = "def aux(x):\n    return x\n".to_string();
    (0..env.len(Split::Train).min(solutions.len()))
        .map(|i| (i, vec![vec![aux.clone(), solutions[i].to_string()]]))
        .chain((0..env.len(Split::Eval)).map(|i| (100 + i, vec![vec![aux.clone(), "def g():\n    pass\n".to_string()]])))
        .collect()
}

fn rewards(env: &Coding, actions: &[(usize, Vec<Vec<String>>)]) -> Vec<f64> {
    actions
        .iter()
        .map(|(i, a)| {
            let (split, item) = if *i >= 100 { (Split::Eval, i - 100) } else { (Split::Train, *i) };
            env.step(split, item, 0, a).expect("a coding reward never fails silently").reward
        })
        .collect()
}

/// Pids of processes running as a uid in `uids`.
fn processes_of(uids: std::ops::Range<u32>) -> Vec<(u32, String)> {
    let mut out = vec![];
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else { continue };
        let Ok(status) = std::fs::read_to_string(e.path().join("status")) else { continue };
        let uid = status.lines().find(|l| l.starts_with("Uid:")).and_then(|l| l.split_whitespace().nth(1)?.parse::<u32>().ok());
        if uid.is_some_and(|u| uids.contains(&u)) {
            let field = |k: &str| status.lines().find(|l| l.starts_with(k)).map(|l| l[k.len()..].trim().to_string()).unwrap_or_default();
            out.push((pid, format!("{} {} ppid {}", field("Name:"), field("State:"), field("PPid:"))));
        }
    }
    out
}

fn sandbox_dirs() -> Vec<String> {
    let prefix = format!("collm-sandbox-{}-", std::process::id());
    std::fs::read_dir(std::env::temp_dir())
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().to_string())
        .filter(|n| n.starts_with(&prefix))
        .collect()
}

#[test]
fn sixty_four_hostile_programs_at_once_while_a_coding_task_runs() {
    let env = Coding::new(CodingTask::Sample, Coding::sample_problems(), Coding::default_sandbox().unwrap()).unwrap();
    let actions = joint_actions(&env);
    let quiet = rewards(&env, &actions);
    assert!(quiet.iter().any(|&r| r != quiet[0]), "the joint actions must score differently: {quiet:?}");

    // A directory the hostile programs try to write into (root's, not world-writable).
    let victim = std::env::temp_dir().join(format!("collm-load-victim-{}", std::process::id()));
    std::fs::create_dir_all(&victim).unwrap();
    let escape = victim.join("escaped.txt");
    let hostile: [(&str, String); 8] = [
        ("loop", "while True:\n    pass\n".into()),
        ("fork bomb", "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n".into()),
        ("allocation", "x = []\nwhile True:\n    x.append(bytearray(64 << 20))\n".into()),
        ("flood", "import sys\nwhile True:\n    sys.stdout.write('y' * 65536)\n".into()),
        ("file escape", format!("open({:?}, 'w').write('out')\nopen('../../escaped.txt', 'w').write('out')\n", escape.to_str().unwrap())),
        ("socket", "import socket\ns = socket.create_connection(('127.0.0.1', 22), timeout=1)\nprint('connected')\n".into()),
        ("orphaned sleeper", "import os, time\nif os.fork() == 0:\n    os.setsid()\n    if os.fork() == 0:\n        time.sleep(1000)\n    os._exit(0)\nprint('left a sleeper')\n".into()),
        ("exhaust files", "fs = []\nwhile True:\n    fs.append(open(__file__))\n".into()),
    ];
    let make = |guard: bool| {
        Arc::new(
            Sandbox::new(Limits { timeout: Duration::from_secs(8), memory_mb: 256, python_guard: guard, ..Limits::default() }, None)
                .unwrap(),
        )
    };
    let (guarded, bare) = (make(true), make(false));
    let t0 = Instant::now();
    let (loaded, outcomes) = std::thread::scope(|s| {
        let runs: Vec<_> = (0..64)
            .map(|i| {
                let sb = if i % 2 == 0 { guarded.clone() } else { bare.clone() };
                let (name, code) = hostile[i % hostile.len()].clone();
                s.spawn(move || (name, i % 2 == 0, sb.run_code(&code).expect("the sandbox itself must not fail")))
            })
            .collect();
        // The coding task scores its joint actions while the hostile programs run.
        let loaded = rewards(&env, &actions);
        (loaded, runs.into_iter().map(|h| h.join().unwrap()).collect::<Vec<_>>())
    });
    let wall = t0.elapsed();
    assert_eq!(loaded, quiet, "the coding rewards changed under load");
    for (name, guard, r) in &outcomes {
        // Under this load a program may reach its time limit before it gets far; either way it
        // must not have done what it tried.
        let contained = match *name {
            "loop" => r.status == Status::Timeout,
            "fork bomb" => r.status != Status::Ok || r.stdout.is_empty(),
            "allocation" => matches!(r.status, Status::Memory | Status::Timeout),
            "flood" => r.output_truncated || r.status == Status::Timeout,
            "socket" => r.status != Status::Ok && !r.stdout.contains("connected"),
            "orphaned sleeper" => !*guard || r.status != Status::Ok,
            _ => r.status != Status::Ok,
        };
        assert!(contained, "{name} (audit hook: {guard}) was not contained: {:?} {:?} {:.300}", r.status, r.reason, r.stderr);
    }
    assert!(!escape.exists(), "a program wrote outside its directory");
    assert!(!std::env::temp_dir().join("escaped.txt").exists());
    // Nothing left behind: no process of a sandbox uid, no run directory.
    // (Killed processes that were reparented to init stay as zombies until init reaps them; they
    // run nothing and hold nothing but a pid, so only live ones count.)
    if bare.isolation.own_uid {
        let live = || processes_of(200_000..2_000_000).into_iter().filter(|(_, s)| !s.contains(" Z ")).collect::<Vec<_>>();
        let t = Instant::now();
        while !live().is_empty() && t.elapsed() < Duration::from_secs(2) {
            std::thread::sleep(Duration::from_millis(50));
        }
        assert_eq!(live(), vec![], "processes left behind");
    }
    assert_eq!(sandbox_dirs(), Vec::<String>::new(), "sandbox directories left behind");
    std::fs::remove_dir_all(&victim).unwrap();
    eprintln!("64 hostile programs and {} coding rewards in {wall:?}: all contained, rewards unchanged, nothing left", actions.len());
}

//! Process lifecycle: startup refusals, socket permissions, one daemon per socket, clean shutdown.

use std::os::unix::fs::PermissionsExt;
use std::process::Command;
use std::time::{Duration, Instant};

use m31r_protocol::{Event, Request};

use crate::common::{Daemon, bundle, spawn};

fn wait_exit(child: &mut std::process::Child, secs: u64) -> std::process::ExitStatus {
    let until = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        assert!(Instant::now() < until, "process did not exit within {secs}s");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_tampered_or_incomplete_bundle_is_refused_naming_the_file() {
    for (file, tamper) in
        [("tokenizer.json", true), ("model.safetensors", true), ("config.yaml", false)]
    {
        let dir = tempfile::tempdir().unwrap();
        let copy = dir.path().join("bundle");
        std::fs::create_dir(&copy).unwrap();
        for entry in std::fs::read_dir(bundle()).unwrap() {
            let entry = entry.unwrap();
            std::fs::copy(entry.path(), copy.join(entry.file_name())).unwrap();
        }
        let path = copy.join(file);
        if tamper {
            let mut bytes = std::fs::read(&path).unwrap();
            let at = bytes.len() / 2;
            bytes[at] ^= 0x20;
            std::fs::write(&path, bytes).unwrap();
        } else {
            std::fs::remove_file(&path).unwrap();
        }
        let mut child = spawn(&copy, &dir.path().join("s.sock"), dir.path(), &[]);
        let status = wait_exit(&mut child, 30);
        let log = std::fs::read_to_string(dir.path().join("m31rd.log")).unwrap();
        assert!(!status.success(), "{file}: m31rd started anyway");
        assert!(log.contains(file), "{file}: message does not name it: {log}");
        assert!(!dir.path().join("s.sock").exists());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn socket_is_private_single_and_removed_on_sigterm() {
    let mut daemon = Daemon::start(&[]);
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&daemon.socket), 0o600);
    assert_eq!(mode(daemon.socket.parent().unwrap()), 0o700);

    // A second daemon on the same socket refuses to start and leaves the first one serving.
    let other = tempfile::tempdir().unwrap();
    let mut second = spawn(bundle(), &daemon.socket, other.path(), &[]);
    assert!(!wait_exit(&mut second, 30).success());
    let log = std::fs::read_to_string(other.path().join("m31rd.log")).unwrap();
    assert!(log.contains("already serving"), "{log}");
    let status =
        daemon.client().await.run(&Request::Status { id: "s".into() }, |_| {}).await.unwrap();
    assert!(matches!(status, Event::Status { .. }));

    // SIGTERM: graceful exit, socket file removed.
    // SAFETY: kill(2) on our own child's pid.
    unsafe { libc::kill(daemon.child.id() as i32, libc::SIGTERM) };
    let status = wait_exit(&mut daemon.child, 10);
    assert!(status.success(), "exit status {status}: {}", daemon.log());
    assert!(!daemon.socket.exists(), "socket file left behind");
}

#[test]
fn a_stale_socket_file_is_replaced() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("stale.sock");
    // Binding and dropping a listener leaves the file with nobody behind it.
    drop(std::os::unix::net::UnixListener::bind(&socket).unwrap());
    assert!(socket.exists());
    let mut child = spawn(bundle(), &socket, dir.path(), &[]);
    let until = Instant::now() + Duration::from_secs(30);
    while std::os::unix::net::UnixStream::connect(&socket).is_err() {
        assert!(child.try_wait().unwrap().is_none(), "m31rd exited");
        assert!(Instant::now() < until, "m31rd did not take over the stale socket");
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_request_stops_the_daemon() {
    let mut daemon = Daemon::start(&[]);
    let mut client = daemon.client().await;
    let reply = client.run(&Request::Shutdown { id: "bye".into() }, |_| {}).await.unwrap();
    assert!(matches!(reply, Event::ShuttingDown { .. }), "{reply:?}");
    assert!(wait_exit(&mut daemon.child, 10).success());
    assert!(!daemon.socket.exists());
}

#[test]
fn print_config_shows_resolved_layers_and_rejects_unknown_keys() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("m31r.toml");
    std::fs::write(&file, "[daemon]\nqueue_len = 7\n").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_m31rd"))
        .args(["--print-config", "--threads", "3", "--config"])
        .arg(&file)
        .env("M31R_PREFILL_CHUNK", "64")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    for expected in ["queue_len = 7", "threads = 3", "prefill_chunk = 64"] {
        assert!(text.contains(expected), "{expected} missing from:\n{text}");
    }
    std::fs::write(&file, "[daemon]\nqueue_length = 7\n").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_m31rd"))
        .args(["--print-config", "--config"])
        .arg(&file)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("queue_length"));
}

#[test]
fn a_gpu_device_is_refused_naming_what_is_missing() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("m31r.toml");
    std::fs::write(&file, "[daemon]\n").unwrap();
    let run = |args: &[&str], env: &[(&str, &str)]| {
        let out = Command::new(env!("CARGO_BIN_EXE_m31rd"))
            .args(args)
            .arg("--config")
            .arg(&file)
            .arg("--bundle")
            .arg(dir.path())
            .envs(env.iter().copied())
            .output()
            .unwrap();
        assert!(!out.status.success());
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    // Refused before the bundle is read: a CPU build names the missing feature, a CUDA build on
    // a machine without a GPU names the device.
    for err in [run(&["--device", "cuda"], &[]), run(&[], &[("M31R_DEVICE", "cuda:0")])] {
        assert!(err.contains("cuda:0"), "{err}");
        assert!(
            err.contains("built without CUDA support") || err.contains("no usable CUDA device"),
            "{err}"
        );
    }
    let err = run(&["--device", "tpu"], &[]);
    assert!(err.contains("\"tpu\"") && err.contains("cuda:N"), "{err}");
}

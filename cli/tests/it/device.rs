//! `--device` of the in-process engine: a GPU is refused with what is missing (CUDA in this
//! binary, or the GPU), and a bad name is refused by value.

use std::process::Command;

fn m31r(args: &[&str]) -> (bool, String) {
    // The device is opened first: the bundle need not exist.
    let bundle = std::env::temp_dir().join("m31r-device-test-no-bundle");
    let out = Command::new(env!("CARGO_BIN_EXE_m31r"))
        .arg("--bundle")
        .arg(bundle)
        .args(args)
        .output()
        .unwrap();
    (out.status.success(), String::from_utf8_lossy(&out.stderr).into_owned())
}

#[test]
fn a_gpu_is_refused_naming_what_is_missing_before_the_bundle_is_read() {
    for args in [&["--device", "cuda", "generate", "fn"][..], &["bench", "--device", "cuda:2"]] {
        let (ok, err) = m31r(args);
        assert!(!ok, "{args:?}");
        let device = if args.contains(&"cuda:2") { "cuda:2" } else { "cuda:0" };
        assert!(err.contains(device), "{args:?}: {err}");
        assert!(
            err.contains("built without CUDA support") || err.contains("no usable CUDA device"),
            "{args:?}: {err}"
        );
    }
    let (ok, err) = m31r(&["--device", "gpu", "generate", "fn"]);
    assert!(!ok && err.contains("\"gpu\"") && err.contains("cuda:N"), "{err}");
}

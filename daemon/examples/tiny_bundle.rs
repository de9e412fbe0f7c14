//! Writes a tiny release bundle with seeded random weights (`m31r_model::demo`, the shape the
//! daemon's integration tests serve), to try `m31rd` and its clients without training a model. Its
//! completions are gibberish but deterministic. Usage: `cargo run -p m31r-daemon --example
//! tiny_bundle -- DIR`.

use anyhow::{anyhow, bail};

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args_os().skip(1);
    let (Some(out), None) = (args.next(), args.next()) else {
        bail!("usage: tiny_bundle DIR (DIR must not exist yet)");
    };
    let out = std::path::PathBuf::from(out);
    m31r_model::demo::write_demo_bundle(&out, "tiny-random")
        .map_err(|e| anyhow!("cannot write the bundle to {}: {e}", out.display()))?;
    println!("{}", out.display());
    Ok(())
}

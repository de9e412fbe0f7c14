//! Checkpoints: weights, optimiser moments and loop state of one step, written to a temporary
//! directory and renamed into place, so a crash or a failed write never damages the previous one.
//! Batches are a pure function of seed and step, so the step is the whole data position.

use std::fs;
use std::path::{Path, PathBuf};

use candle_core::Device;
use candle_nn::VarMap;
use serde::{Deserialize, Serialize};

use crate::error::Error;
use crate::train::optim::Optimizer;

/// Folder of the checkpoints inside a run directory.
pub const CHECKPOINTS_DIR: &str = "checkpoints";
const WEIGHTS: &str = "model.safetensors";
const OPTIMIZER: &str = "optimizer.safetensors";
const STATE: &str = "state.json";

/// Loop state saved with each checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoopState {
    /// Optimiser steps completed.
    pub step: u64,
    /// Training tokens consumed.
    pub tokens_seen: u64,
    /// Steps whose gradient was clipped.
    pub clipped_steps: u64,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::Io { path: path.to_path_buf(), source }
}

fn candle(path: &Path) -> impl FnOnce(candle_core::Error) -> Error + '_ {
    move |e| Error::Invalid { path: path.to_path_buf(), reason: e.to_string() }
}

fn step_dir_name(step: u64) -> String {
    format!("step-{step:08}")
}

/// Writes the checkpoint of `state.step`, then prunes all but the newest `keep` checkpoints.
pub fn save(
    run_dir: &Path,
    vars: &VarMap,
    optimizer: &Optimizer,
    state: &LoopState,
    keep: usize,
) -> Result<PathBuf, Error> {
    let root = run_dir.join(CHECKPOINTS_DIR);
    fs::create_dir_all(&root).map_err(io(&root))?;
    let name = step_dir_name(state.step);
    let tmp = root.join(format!(".{name}.tmp"));
    let dest = root.join(&name);
    if tmp.is_dir() {
        fs::remove_dir_all(&tmp).map_err(io(&tmp))?; // debris of an interrupted write
    }
    let written = (|| {
        fs::create_dir(&tmp).map_err(io(&tmp))?;
        vars.save(tmp.join(WEIGHTS)).map_err(candle(&tmp.join(WEIGHTS)))?;
        candle_core::safetensors::save(&optimizer.state(), tmp.join(OPTIMIZER))
            .map_err(candle(&tmp.join(OPTIMIZER)))?;
        let json = serde_json::to_vec_pretty(state)
            .map_err(|e| Error::Invalid { path: tmp.join(STATE), reason: e.to_string() })?;
        fs::write(tmp.join(STATE), json).map_err(io(&tmp.join(STATE)))?;
        for file in [WEIGHTS, OPTIMIZER, STATE] {
            let p = tmp.join(file);
            fs::File::open(&p).and_then(|f| f.sync_all()).map_err(io(&p))?;
        }
        if dest.exists() {
            fs::remove_dir_all(&dest).map_err(io(&dest))?;
        }
        fs::rename(&tmp, &dest).map_err(io(&dest))?;
        fs::File::open(&root).and_then(|d| d.sync_all()).map_err(io(&root))
    })();
    if let Err(e) = written {
        let _ = fs::remove_dir_all(&tmp);
        return Err(e);
    }
    prune(&root, keep)?;
    Ok(dest)
}

/// Complete checkpoints (those with a state file), oldest first.
pub fn list(run_dir: &Path) -> Result<Vec<(u64, PathBuf)>, Error> {
    let root = run_dir.join(CHECKPOINTS_DIR);
    if !root.is_dir() {
        return Ok(Vec::new());
    }
    let mut found = Vec::new();
    for entry in fs::read_dir(&root).map_err(io(&root))? {
        let entry = entry.map_err(io(&root))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if let Some(step) = name.strip_prefix("step-").and_then(|s| s.parse::<u64>().ok())
            && entry.path().join(STATE).is_file()
        {
            found.push((step, entry.path()));
        }
    }
    found.sort();
    Ok(found)
}

fn prune(root: &Path, keep: usize) -> Result<(), Error> {
    let all = list(root.parent().unwrap_or(root))?;
    for (_, dir) in all.iter().take(all.len().saturating_sub(keep.max(1))) {
        fs::remove_dir_all(dir).map_err(io(dir))?;
    }
    Ok(())
}

/// Restores weights and optimiser state from `dir`; returns its loop state.
pub fn load(dir: &Path, vars: &mut VarMap, optimizer: &mut Optimizer) -> Result<LoopState, Error> {
    let state_path = dir.join(STATE);
    let text = fs::read(&state_path).map_err(io(&state_path))?;
    let state: LoopState = serde_json::from_slice(&text)
        .map_err(|e| Error::Invalid { path: state_path.clone(), reason: e.to_string() })?;
    let weights = dir.join(WEIGHTS);
    vars.load(&weights).map_err(candle(&weights))?;
    let opt_path = dir.join(OPTIMIZER);
    let moments =
        candle_core::safetensors::load(&opt_path, &Device::Cpu).map_err(candle(&opt_path))?;
    optimizer.load_state(&moments, state.step).map_err(candle(&opt_path))?;
    Ok(state)
}

//! `m31r-train params`: the per-component parameter table of a preset, or of the shape the
//! parameter-budget solver picks for a target size.

use std::fmt::Write as _;

use m31r_model::config::{ConfigError, ModelConfig, Preset, RawModelConfig};
use m31r_model::params::{ParamTable, SolverSpec};

/// What to print the table of.
#[derive(Debug, Clone, PartialEq)]
pub enum ParamsQuery {
    /// A named preset (`tiny`, `small`, `medium`, `large`), optionally with another vocabulary
    /// (as training does: the preset's shape with the tokenizer's vocabulary).
    Preset {
        /// Preset name.
        name: String,
        /// Vocabulary to use instead of the preset's.
        vocab: Option<usize>,
    },
    /// The solver's shape for a budget.
    Target {
        /// What the solver is asked for.
        spec: SolverSpec,
        /// Context length of the resulting config.
        context_length: usize,
    },
}

impl ParamsQuery {
    /// A target-size query with the `small` preset's solver settings (embedding ratio, GLU
    /// expansion, head size, tied head) and context, and vocabulary `vocab`.
    pub fn target(target_params: u64, vocab: usize) -> Self {
        let small = Preset::ALL[1];
        Self::Target {
            spec: SolverSpec { target_params, vocab_size: vocab, ..small.spec },
            context_length: small.context_length,
        }
    }
}

/// The printed report: a header line with the shape, then the table.
pub fn params_report(query: &ParamsQuery) -> Result<String, ConfigError> {
    let (header, config) = match query {
        ParamsQuery::Preset { name, vocab } => {
            let preset = ModelConfig::preset(name)?;
            let config = match vocab {
                Some(v) => ModelConfig::new(&RawModelConfig { vocab_size: *v, ..preset.to_raw() })?,
                None => preset,
            };
            (format!("preset {name}"), config)
        }
        ParamsQuery::Target { spec, context_length } => {
            // Solved and built as a preset's shape is; the name is not used.
            let target = Preset { name: "target", spec: *spec, context_length: *context_length };
            let config = target.config()?;
            let off = 100.0 * (config.param_count() as f64 / spec.target_params as f64 - 1.0);
            (
                format!(
                    "target {} parameters ({off:+.2}%; embedding ratio {}, GLU expansion {:.3}, \
                     head size {})",
                    spec.target_params, spec.embedding_ratio, spec.glu_expansion, spec.head_dim
                ),
                config,
            )
        }
    };
    let mut out = String::new();
    let _ = writeln!(out, "{header}");
    let _ = writeln!(
        out,
        "d_model {} · {} layers · {} heads ({} kv) · head size {} · d_ff {} · vocab {} · context {}{}",
        config.d_model(),
        config.n_layers(),
        config.n_heads(),
        config.n_kv_heads(),
        config.head_dim(),
        config.d_ff(),
        config.vocab_size(),
        config.context_length(),
        if config.tie_embeddings() { " · tied head" } else { "" }
    );
    let _ = writeln!(out, "{}", ParamTable::for_config(&config));
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_target_solves_to_the_preset_with_its_spec() {
        for preset in Preset::ALL {
            let of_preset = ParamsQuery::Preset { name: preset.name.to_owned(), vocab: None };
            let of_target =
                ParamsQuery::Target { spec: preset.spec, context_length: preset.context_length };
            let (of_preset, of_target) =
                (params_report(&of_preset).unwrap(), params_report(&of_target).unwrap());
            // The first line names the query; the shape and the table follow.
            assert_eq!(
                of_preset.split_once('\n').unwrap().1,
                of_target.split_once('\n').unwrap().1
            );
        }
    }
}

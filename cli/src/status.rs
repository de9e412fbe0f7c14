//! `m31r status`: the daemon's model, cache, queue, memory and counters, for people or as JSON.

use anyhow::bail;
use m31r_protocol::{DaemonStatus, Event, Request};

use crate::connection::{Connection, open};
use crate::stream::wire;

/// Asks for the status and prints it (pretty JSON with `json`).
pub fn run(conn: &Connection, json: bool) -> anyhow::Result<()> {
    let mut target = open(conn, true)?;
    let event = target.run(&Request::Status { id: "status".into() }, &mut |_| {})?;
    let Event::Status { status, .. } = event else {
        bail!("{} answered status with {}", target.describe(), wire(&event));
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&status)?);
    } else {
        print!("{}", format_status(&target.describe(), &status));
    }
    Ok(())
}

fn format_status(source: &str, s: &DaemonStatus) -> String {
    let m = &s.model;
    let hit = if s.cached_tokens + s.prefilled_tokens > 0 {
        format!(
            " ({:.0}% of prompt tokens from cache)",
            100.0 * s.cached_tokens as f64 / (s.cached_tokens + s.prefilled_tokens) as f64
        )
    } else {
        String::new()
    };
    let uptime = s.uptime_s as u64;
    format!(
        "{source}\n\
         model     {} · {} parameters · context {} tokens · {}\n\
         uptime    {}h {:02}m {:02}s · {} connections · {} queued\n\
         cache     {} sequences · {} tokens · {} of {} budget\n\
         memory    {} resident\n\
         requests  {} finished · {} cancelled · {} failed\n\
         tokens    {} from cache · {} prefilled · {} generated{hit}\n",
        if m.version.is_empty() { "(unversioned)" } else { &m.version },
        m.parameters,
        m.context_length,
        m.precision,
        uptime / 3600,
        uptime / 60 % 60,
        uptime % 60,
        s.connections,
        s.queued,
        s.cache_entries,
        s.cache_tokens,
        mib(s.cache_bytes),
        mib(s.cache_budget_bytes),
        mib(s.resident_bytes),
        s.requests,
        s.cancelled,
        s.errors,
        s.cached_tokens,
        s.prefilled_tokens,
        s.generated_tokens,
    )
}

/// Bytes in MiB, for people.
pub fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1u64 << 20) as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_is_readable() {
        let status = DaemonStatus {
            uptime_s: 3725.0,
            cached_tokens: 300,
            prefilled_tokens: 100,
            cache_budget_bytes: 512 << 20,
            ..DaemonStatus::default()
        };
        let text = format_status("m31rd at /s", &status);
        assert!(text.contains("1h 02m 05s"), "{text}");
        assert!(text.contains("75% of prompt tokens from cache"), "{text}");
        assert!(text.contains("of 512.0 MiB budget"), "{text}");
    }
}

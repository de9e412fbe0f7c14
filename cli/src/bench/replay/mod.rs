//! `m31r bench replay DIR`: retypes sampled lines of held-out Rust files through the real
//! `m31r-lsp` and `m31rd` (child processes, a private socket) and measures what an editor would
//! see: characters saved by accepting a suggestion that completes the line, requests, how many
//! reached the daemon, and the latency of each keystroke's request.

mod lsp_client;
mod sample;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Args;
use m31r_protocol::PROTOCOL_VERSION;
use serde_json::{Value, json};

use self::lsp_client::LspClient;
use self::sample::{LinePick, SourceFile};
use super::TempDir;
use crate::connection::Connection;

/// How long the daemon may take to open its socket (loading a bundle), before the replay gives up.
const DAEMON_START: Duration = Duration::from_secs(120);

/// `m31r bench replay`'s options.
#[derive(Debug, Args)]
pub struct ReplayArgs {
    /// Directory of held-out Rust files (`.rs`, searched recursively).
    dir: PathBuf,
    /// Lines to retype, sampled from all non-blank lines of at most 200 characters.
    #[arg(long, value_name = "N", default_value_t = 100)]
    lines: usize,
    /// Seed of the line sample.
    #[arg(long, default_value_t = 31)]
    seed: u64,
    /// The `m31r-lsp` executable [default: next to this `m31r`].
    #[arg(long, value_name = "PATH")]
    lsp: Option<PathBuf>,
    /// The `m31rd` executable [default: next to this `m31r`].
    #[arg(long, value_name = "PATH")]
    daemon: Option<PathBuf>,
    /// Send other documents whole instead of as similar snippets (`contextSnippets: false`).
    #[arg(long)]
    no_snippets: bool,
    /// Run the daemon without token healing (`M31R_TOKEN_HEALING=false`).
    #[arg(long)]
    no_token_healing: bool,
    /// Show degenerate output too (`degenerateFilters: false`).
    #[arg(long)]
    no_filters: bool,
    /// Do not ask for the completion after a shown one in the background (`speculativeNext:
    /// false`).
    #[arg(long)]
    no_speculative: bool,
    /// The confidence gate's threshold (`minConfidence`, 0..=1) [default: the server's]; a
    /// comma-separated list replays once per value and ends with a table of the curve
    /// (suggestions shown, precision, chars saved), for calibrating the default.
    #[arg(long, value_name = "F[,F…]", value_delimiter = ',')]
    min_confidence: Vec<f64>,
    /// Print the results as JSON.
    #[arg(long)]
    json: bool,
}

/// What the replay counted.
#[derive(Debug, Default)]
struct Tally {
    lines: usize,
    chars: usize,
    typed: usize,
    saved: usize,
    first_request: usize,
    requests: usize,
    /// Answers that showed a suggestion (one per keystroke that showed one).
    shown: usize,
    /// Of which accepted: they completed the line.
    accepted: usize,
    latencies_ms: Vec<f64>,
    /// From opening each file to the end of the server's cache warm-up.
    warmups_ms: Vec<f64>,
}

/// Runs the replay with the bundle of `--bundle` (once per `--min-confidence` value) and prints
/// the results.
pub fn run(conn: &Connection, args: &ReplayArgs) -> anyhow::Result<()> {
    if let Some(bad) = args.min_confidence.iter().find(|f| !(0.0..=1.0).contains(*f)) {
        bail!("--min-confidence {bad}: outside 0..=1");
    }
    if args.min_confidence.len() <= 1 {
        let report = replay(conn, args, args.min_confidence.first().copied())?;
        if args.json {
            println!("{}", serde_json::to_string_pretty(&report)?);
        }
        return Ok(());
    }
    let mut reports = Vec::new();
    for &threshold in &args.min_confidence {
        reports.push(replay(conn, args, Some(threshold))?);
        if !args.json {
            println!();
        }
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&reports)?);
    } else {
        print_curve(&reports);
    }
    Ok(())
}

/// The confidence curve: one row per threshold.
fn print_curve(reports: &[Value]) {
    println!("min confidence | shown | accepted | precision | chars saved | lines at 1st request");
    for r in reports {
        println!(
            "{:>14} | {:>5} | {:>8} | {:>8.1}% | {:>5} ({:.1}%) | {}",
            r["settings"]["min_confidence"].to_string(),
            r["shown"].to_string(),
            r["accepted"].to_string(),
            r["precision_percent"].as_f64().unwrap_or(0.0),
            r["chars_saved"].to_string(),
            r["saved_percent"].as_f64().unwrap_or(0.0),
            r["lines_completed_at_first_request"]
        );
    }
}

/// One replay with `min_confidence` (`None`: the server's default); prints its report unless
/// `--json`, and returns it.
fn replay(
    conn: &Connection,
    args: &ReplayArgs,
    min_confidence: Option<f64>,
) -> anyhow::Result<Value> {
    let Some(bundle) = &conn.bundle else {
        bail!("m31r bench replay needs --bundle DIR: the model the daemon serves");
    };
    let files = sample::rust_files(&args.dir)?;
    let picks = sample::sample_lines(&files, args.lines, args.seed);
    if picks.is_empty() {
        bail!(
            "no line to retype under {} (all blank or longer than 200 characters)",
            args.dir.display()
        );
    }
    let lsp_exe = sibling_or(args.lsp.as_deref(), "m31r-lsp")?;
    let daemon_exe = sibling_or(args.daemon.as_deref(), "m31rd")?;

    let temp = std::env::temp_dir().join(format!("m31r-replay-{}", std::process::id()));
    std::fs::create_dir_all(&temp)
        .with_context(|| format!("cannot create replay directory {}", temp.display()))?;
    let temp = TempDir(temp);
    let socket = temp.0.join("m31rd.sock");
    let daemon =
        Daemon::start(&daemon_exe, bundle, &socket, &temp.0, conn.threads, conn.recall, args)?;
    let mut lsp = LspClient::spawn(&lsp_exe, &socket, &temp.0.join("lsp.log"))?;
    let mut settings = json!({"autoStart": false, "contextSnippets": !args.no_snippets,
        "degenerateFilters": !args.no_filters, "speculativeNext": !args.no_speculative});
    if let Some(threshold) = min_confidence {
        settings["minConfidence"] = json!(threshold);
    }
    lsp.request(
        "initialize",
        json!({"processId": std::process::id(), "rootUri": file_uri(&args.dir), "capabilities": {},
            "initializationOptions": settings}),
    )?;
    lsp.notify("initialized", json!({}))?;

    let mut tally = Tally::default();
    for pick in &picks {
        replay_line(&mut lsp, &files, *pick, &mut tally)?;
    }
    let status = lsp.request("m31r/status", Value::Null)?;
    let shown = std::mem::take(&mut lsp.shown_messages);
    lsp.shut_down()?;
    daemon.stop();

    let files_used = {
        let mut f: Vec<usize> = picks.iter().map(|p| p.file).collect();
        f.dedup();
        f.len()
    };
    let mut report = report(&tally, &status, args, files_used, min_confidence);
    // The daemon's recall: the flag, else the daemon's default (its config file is not read).
    report["settings"]["recall"] = json!(conn.recall.unwrap_or_default().to_string());
    if !args.json {
        print_report(&report, args, bundle);
    }
    for message in shown {
        eprintln!("m31r-lsp showed: {message}");
    }
    // The server's warnings (a failed daemon request, …) are kept in its log, which goes with the
    // temporary directory: show the first few.
    let log = std::fs::read_to_string(temp.0.join("lsp.log")).unwrap_or_default();
    let warnings: Vec<&str> = log.lines().filter(|l| l.contains(" WARN ")).collect();
    for line in warnings.iter().take(5) {
        eprintln!("m31r-lsp log: {line}");
    }
    if warnings.len() > 5 {
        eprintln!("m31r-lsp log: … {} more warnings", warnings.len() - 5);
    }
    Ok(report)
}

/// Retypes one line: asks at the cursor, accepts a suggestion that completes the line, else
/// types the next character and asks again.
fn replay_line(
    lsp: &mut LspClient,
    files: &[SourceFile],
    pick: LinePick,
    tally: &mut Tally,
) -> anyhow::Result<()> {
    let file = &files[pick.file];
    let Some(cut) = sample::cut_line(&file.text, pick.line) else {
        bail!("{} has no line {}", file.path.display(), pick.line + 1);
    };
    let uri = file_uri(&file.path);
    let line = u32::try_from(pick.line).with_context(|| {
        format!("line {} of {} is too far down", pick.line, file.path.display())
    })?;
    // The editor's other tabs: files next to this one, as a person working on it has open.
    let neighbours = neighbours(files, pick.file);
    for &other in &neighbours {
        let other = &files[other];
        lsp.notify(
            "textDocument/didOpen",
            json!({"textDocument": {"uri": file_uri(&other.path), "languageId": "rust",
                "version": 1, "text": other.text}}),
        )?;
    }
    lsp.notify(
        "textDocument/didOpen",
        json!({"textDocument": {"uri": uri, "languageId": "rust", "version": 1, "text": cut.doc}}),
    )?;
    tally.warmups_ms.push(settle(lsp)?);
    let original = format!("{}{}", cut.indent, cut.body);
    let body: Vec<char> = cut.body.chars().collect();
    let mut current = cut.indent.clone();
    let mut version = 1;
    tally.lines += 1;
    tally.chars += body.len();
    for (typed, &next) in body.iter().enumerate() {
        let col = sample::utf16_len(&current);
        let t = Instant::now();
        let result = lsp.request(
            "textDocument/inlineCompletion",
            json!({"textDocument": {"uri": uri}, "position": {"line": line, "character": col},
                "context": {"triggerKind": 2}}),
        )?;
        tally.latencies_ms.push(t.elapsed().as_secs_f64() * 1e3);
        tally.requests += 1;
        if result["items"].as_array().is_some_and(|items| !items.is_empty()) {
            tally.shown += 1;
        }
        if completes(&result, line, &current, &original) {
            tally.accepted += 1;
            tally.saved += body.len() - typed;
            if typed == 0 {
                tally.first_request += 1;
            }
            break;
        }
        version += 1;
        let at = json!({"line": line, "character": col});
        lsp.notify(
            "textDocument/didChange",
            json!({"textDocument": {"uri": uri, "version": version},
                "contentChanges": [{"range": {"start": at, "end": at}, "text": next.to_string()}]}),
        )?;
        current.push(next);
        tally.typed += 1;
    }
    lsp.notify("textDocument/didClose", json!({"textDocument": {"uri": uri}}))?;
    for other in neighbours {
        let uri = file_uri(&files[other].path);
        lsp.notify("textDocument/didClose", json!({"textDocument": {"uri": uri}}))?;
    }
    Ok(())
}

/// Files the replay opens beside the one it types in, as an editor's other tabs: up to
/// [`NEIGHBOURS`] others from the same directory, in the files' (sorted) order.
fn neighbours(files: &[SourceFile], file: usize) -> Vec<usize> {
    let dir = files[file].path.parent();
    (0..files.len())
        .filter(|&i| i != file && files[i].path.parent() == dir)
        .take(NEIGHBOURS)
        .collect()
}

/// Other files open while a line is retyped: what context snippets are chosen from.
const NEIGHBOURS: usize = 3;

/// Waits until the server's cache warm-ups have ended, as a person reads a file they opened
/// before typing in it; the milliseconds it took (reported apart from keystroke latency).
fn settle(lsp: &mut LspClient) -> anyhow::Result<f64> {
    let start = Instant::now();
    loop {
        let status = lsp.request("m31r/status", Value::Null)?;
        if status["warming"].as_u64() == Some(0) {
            return Ok(start.elapsed().as_secs_f64() * 1e3);
        }
        if start.elapsed() > DAEMON_START {
            bail!("the daemon's cache warm-up did not end within {DAEMON_START:?}: {status}");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Whether the first item of an `inlineCompletion` result makes the cursor's line `original`.
fn completes(result: &Value, line: u32, current: &str, original: &str) -> bool {
    let Some(item) = result["items"].as_array().and_then(|items| items.first()) else {
        return false;
    };
    let (start, end) = (&item["range"]["start"], &item["range"]["end"]);
    let on_line = start["line"] == json!(line) && end["line"] == json!(line);
    let col = |p: &Value| p["character"].as_u64().and_then(|c| u32::try_from(c).ok());
    match (on_line, col(start), col(end), item["insertText"].as_str()) {
        (true, Some(s), Some(e), Some(text)) => {
            sample::completes_line(current, s, e, text, original)
        }
        _ => false,
    }
}

/// The results, as `--json` prints them.
fn report(
    tally: &Tally,
    status: &Value,
    args: &ReplayArgs,
    files: usize,
    min_confidence: Option<f64>,
) -> Value {
    let count = |key: &str| status[key].as_u64().unwrap_or(0);
    let by_daemon = count("servedByDaemon");
    let mut latencies = tally.latencies_ms.clone();
    latencies.sort_by(f64::total_cmp);
    let mut warmups = tally.warmups_ms.clone();
    warmups.sort_by(f64::total_cmp);
    json!({
        "lines": tally.lines,
        "files": files,
        "seed": args.seed,
        "chars": tally.chars,
        "chars_typed": tally.typed,
        "chars_saved": tally.saved,
        "saved_percent": ratio(tally.saved as f64 * 100.0, tally.chars as f64),
        "lines_completed_at_first_request": tally.first_request,
        "requests": tally.requests,
        "shown": tally.shown,
        "accepted": tally.accepted,
        "precision_percent": ratio(tally.accepted as f64 * 100.0, tally.shown as f64),
        "served_by_daemon": by_daemon,
        "served_locally": count("servedLocally"),
        "suppressed": count("suppressed"),
        "suppressed_by": status["suppressedBy"].clone(),
        "daemon_requests_per_keystroke": ratio(by_daemon as f64, tally.requests as f64),
        "latency_ms": {
            "p50": percentile(&latencies, 50.0),
            "p90": percentile(&latencies, 90.0),
            "p99": percentile(&latencies, 99.0),
        },
        "file_open_warmup_ms": {
            "p50": percentile(&warmups, 50.0),
            "max": warmups.last().copied().unwrap_or(0.0),
        },
        "settings": {
            "context_snippets": !args.no_snippets,
            "token_healing": !args.no_token_healing,
            "degenerate_filters": !args.no_filters,
            "speculative_next": !args.no_speculative,
            "min_confidence": min_confidence.map_or(json!("default"), |f| json!(f)),
        },
    })
}

fn print_report(report: &Value, args: &ReplayArgs, bundle: &Path) {
    let on_off = |on: bool| if on { "on" } else { "off" };
    println!(
        "m31r bench replay: {} lines of {} files under {} (seed {}), bundle {}",
        report["lines"],
        report["files"],
        args.dir.display(),
        args.seed,
        bundle.display()
    );
    println!(
        "settings: context snippets {}, token healing {}, degenerate filters {}, min confidence \
         {}, recall {} (typing along a suggestion is always on)",
        on_off(!args.no_snippets),
        on_off(!args.no_token_healing),
        on_off(!args.no_filters),
        report["settings"]["min_confidence"],
        report["settings"]["recall"].as_str().unwrap_or("default")
    );
    println!(
        "chars: {} typed, {} saved of {} ({:.1}%)",
        report["chars_typed"],
        report["chars_saved"],
        report["chars"],
        report["saved_percent"].as_f64().unwrap_or(0.0)
    );
    println!(
        "lines completed at the first request: {}",
        report["lines_completed_at_first_request"]
    );
    println!(
        "suggestions shown: {} · accepted {} ({:.1}% precision)",
        report["shown"],
        report["accepted"],
        report["precision_percent"].as_f64().unwrap_or(0.0)
    );
    println!(
        "requests: {} · answered by the daemon {}, from the typed-along suggestion {}, \
         suppressed {} · {:.2} daemon requests per keystroke",
        report["requests"],
        report["served_by_daemon"],
        report["served_locally"],
        report["suppressed"],
        report["daemon_requests_per_keystroke"].as_f64().unwrap_or(0.0)
    );
    if let Some(reasons) = report["suppressed_by"].as_object().filter(|r| !r.is_empty()) {
        let reasons: Vec<String> = reasons.iter().map(|(code, n)| format!("{code} {n}")).collect();
        println!("suppressed by reason: {}", reasons.join(", "));
    }
    let ms = |p: &str| report["latency_ms"][p].as_f64().unwrap_or(0.0);
    println!(
        "keystroke latency (request sent → answer, as the editor sees it): p50 {:.1} ms · p90 \
         {:.1} ms · p99 {:.1} ms",
        ms("p50"),
        ms("p90"),
        ms("p99")
    );
    let warm = |p: &str| report["file_open_warmup_ms"][p].as_f64().unwrap_or(0.0);
    println!(
        "file opened → cache warm (waited before typing, not counted above): p50 {:.1} ms · max \
         {:.1} ms",
        warm("p50"),
        warm("max")
    );
}

fn ratio(a: f64, b: f64) -> f64 {
    if b > 0.0 { a / b } else { 0.0 }
}

/// The nearest-rank percentile `p` of `sorted` (0 when empty).
fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// `flag`, else the executable `name` next to this `m31r` (where cargo and the release archive
/// put all three).
fn sibling_or(flag: Option<&Path>, name: &str) -> anyhow::Result<PathBuf> {
    if let Some(path) = flag {
        return Ok(path.to_path_buf());
    }
    let exe = std::env::current_exe().context("cannot find the m31r executable")?;
    let path = exe.with_file_name(name);
    if !path.exists() {
        bail!("no {name} at {} (pass its path with --{})", path.display(), flag_name(name));
    }
    Ok(path)
}

fn flag_name(exe: &str) -> &'static str {
    if exe == "m31rd" { "daemon" } else { "lsp" }
}

/// A `file://` URI of `path` made absolute, bytes outside the unreserved set percent-encoded.
fn file_uri(path: &Path) -> String {
    let absolute = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
    let mut uri = String::from("file://");
    for &b in absolute.to_string_lossy().as_bytes() {
        if b.is_ascii_alphanumeric() || b"-._~/".contains(&b) {
            uri.push(b as char);
        } else {
            uri.push_str(&format!("%{b:02X}"));
        }
    }
    uri
}

/// The `m31rd` child serving the bundle on a private socket.
struct Daemon {
    child: Child,
    socket: PathBuf,
}

impl Daemon {
    fn start(
        exe: &Path,
        bundle: &Path,
        socket: &Path,
        dir: &Path,
        threads: usize,
        recall: Option<m31r_model::recall::RecallParams>,
        args: &ReplayArgs,
    ) -> anyhow::Result<Self> {
        let log_path = dir.join("m31rd.log");
        let log = std::fs::File::create(&log_path)
            .with_context(|| format!("cannot create {}", log_path.display()))?;
        let mut command = Command::new(exe);
        command
            .arg("--bundle")
            .arg(bundle)
            .arg("--socket")
            .arg(socket)
            // A config file that does not exist: the user's own config must not change the run.
            .arg("--config")
            .arg(dir.join("no-config.toml"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        if threads > 0 {
            command.env("M31R_THREADS", threads.to_string());
        }
        if args.no_token_healing {
            command.env("M31R_TOKEN_HEALING", "false");
        }
        // The flag, else the daemon's default: a recall set in this shell's environment must
        // not change the run silently.
        command.env("M31R_RECALL", recall.unwrap_or_default().to_string());
        let child = command
            .spawn()
            .with_context(|| format!("cannot start the daemon {}", exe.display()))?;
        let mut daemon = Self { child, socket: socket.to_path_buf() };
        let until = Instant::now() + DAEMON_START;
        while UnixStream::connect(socket).is_err() {
            if let Some(status) = daemon.child.try_wait()? {
                let log = std::fs::read_to_string(&log_path).unwrap_or_default();
                bail!(
                    "{} exited with {status} before opening {}:\n{log}",
                    exe.display(),
                    socket.display()
                );
            }
            if Instant::now() > until {
                bail!(
                    "{} did not open {} within {} s",
                    exe.display(),
                    socket.display(),
                    DAEMON_START.as_secs()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(daemon)
    }

    /// Asks the daemon to shut down over the protocol (it removes its socket), then waits.
    fn stop(mut self) {
        if let Ok(mut stream) = UnixStream::connect(&self.socket) {
            let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
            let frames = format!(
                "{{\"type\":\"hello\",\"version\":{PROTOCOL_VERSION}}}\n\
                 {{\"type\":\"shutdown\",\"id\":\"s\"}}\n"
            );
            let _ = stream.write_all(frames.as_bytes());
            let mut answer = String::new();
            let _ = stream.read_to_string(&mut answer);
        }
        let until = Instant::now() + Duration::from_secs(10);
        while Instant::now() < until {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        // Drop kills it.
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_are_nearest_rank() {
        let v: Vec<f64> = (1..=10).map(f64::from).collect();
        assert_eq!(percentile(&v, 50.0), 5.0);
        assert_eq!(percentile(&v, 90.0), 9.0);
        assert_eq!(percentile(&v, 99.0), 10.0);
        assert_eq!(percentile(&[], 50.0), 0.0);
    }

    #[test]
    fn the_first_item_must_complete_the_cursor_line() {
        let item = |text: &str, line: u32| {
            json!({"items": [{"insertText": text,
                "range": {"start": {"line": line, "character": 2}, "end": {"line": line, "character": 2}}}]})
        };
        assert!(completes(&item("t x;\nnext", 3), 3, "le", "let x;"));
        assert!(!completes(&item("t x;", 4), 3, "le", "let x;"));
        assert!(!completes(&item("t y;", 3), 3, "le", "let x;"));
        assert!(!completes(&json!({"items": []}), 3, "le", "let x;"));
    }

    #[test]
    fn file_uris_are_absolute_and_encoded() {
        assert_eq!(file_uri(Path::new("/a b/c#.rs")), "file:///a%20b/c%23.rs");
        assert!(file_uri(Path::new("rel.rs")).starts_with("file:///"));
    }
}

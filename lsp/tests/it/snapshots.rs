//! Snapshot tests (`expect-test`, `$0` cursor fixtures) of request building and of every
//! post-processing rule. `UPDATE_EXPECT=1 cargo test -p m31r-lsp` rewrites them.

use expect_test::{Expect, expect};
use m31r_lsp::config::Config;
use m31r_lsp::document::Document;
use m31r_lsp::postprocess::{Indent, postprocess};
use m31r_lsp::request::{ContextDoc, Prepared, Windows, build};

use crate::fixture::cursor;

fn prepare(
    fixture: &str,
    context: &[ContextDoc<'_>],
    config: &Config,
    windows: &Windows,
) -> Prepared {
    let (text, at) = cursor(fixture);
    build(&Document::new(text, 0, "rust".into()), at, context, config, windows)
}

fn render_request(p: &Prepared) -> String {
    let mut out = format!(
        "window: lines {}..{}, shape {:?}, max_tokens {}, stop {:?}\n",
        p.prefix_start_line, p.suffix_end_line, p.site.shape, p.params.max_tokens, p.params.stop
    );
    for file in &p.input.context_files {
        out += &format!("context {} ({} bytes): {:?}\n", file.path, file.text.len(), file.text);
    }
    out += &format!("prefix: {:?}\nsuffix: {:?}\n", p.input.prefix, p.input.suffix);
    out += &format!("line: {:?} | {:?}\n", p.site.line_prefix, p.site.line_suffix);
    out
}

fn check_request(fixture: &str, context: &[ContextDoc<'_>], expect: Expect) {
    let p = prepare(fixture, context, &Config::default(), &Windows::default());
    expect.assert_eq(&render_request(&p));
}

#[test]
fn request_at_an_empty_line_is_multi_line_with_the_whole_small_file() {
    check_request(
        "use std::io;\n\nfn main() {\n    $0\n}\n",
        &[],
        expect![[r#"
            window: lines 0..6, shape MultiLine, max_tokens 128, stop []
            prefix: "use std::io;\n\nfn main() {\n    "
            suffix: "\n}\n"
            line: "    " | ""
        "#]],
    );
}

#[test]
fn request_mid_line_is_single_line_and_stops_at_newline() {
    check_request(
        "fn main() {\n    let x = $0foo();\n}",
        &[],
        expect![[r#"
            window: lines 0..3, shape SingleLine, max_tokens 48, stop ["\n"]
            prefix: "fn main() {\n    let x = "
            suffix: "foo();\n}"
            line: "    let x = " | "foo();"
        "#]],
    );
}

#[test]
fn request_before_auto_closed_punctuation_is_multi_line() {
    check_request(
        "fn main() {\n    run($0);\n}\n",
        &[],
        expect![[r#"
            window: lines 0..4, shape MultiLine, max_tokens 128, stop []
            prefix: "fn main() {\n    run("
            suffix: ");\n}\n"
            line: "    run(" | ");"
        "#]],
    );
}

#[test]
fn context_documents_keep_their_order_and_the_last_ones_win() {
    let windows = Windows { context_files: 2, context_bytes: 12, ..Windows::default() };
    let context = [
        ContextDoc { path: "src/a.rs", text: "pub fn a() {}\n" },
        ContextDoc { path: "src/b.rs", text: "pub fn b() {}\n" },
        ContextDoc { path: "src/c.rs", text: "pub const C: u8 = 1;\npub const D: u8 = 2;\n" },
    ];
    let whole = Config { context_snippets: false, ..Config::default() };
    let p = prepare("fn main() {$0}", &context, &whole, &windows);
    expect![[r#"
        window: lines 0..1, shape MultiLine, max_tokens 128, stop []
        context src/b.rs (12 bytes): "pub fn b() {"
        context src/c.rs (12 bytes): "pub const C:"
        prefix: "fn main() {"
        suffix: "}"
        line: "fn main() {" | "}"
    "#]]
    .assert_eq(&render_request(&p));
    let off = Config { context_files: false, max_tokens: 16, ..Config::default() };
    let p = prepare("fn main() {$0}", &context, &off, &windows);
    assert!(p.input.context_files.is_empty());
    assert_eq!(p.params.max_tokens, 16);
}

#[test]
fn windows_start_and_end_on_stable_lines_while_typing() {
    let text: String = (0..400).map(|i| format!("let v{i} = {i};\n")).collect();
    let line_start = |l: usize| text.match_indices('\n').nth(l - 1).unwrap().0 + 1;
    let windows = Windows::default();
    let at = |offset: usize| {
        let mut fixture = text.clone();
        fixture.insert_str(offset, "$0");
        prepare(&fixture, &[], &Config::default(), &windows)
    };
    let first = at(line_start(300) + 4);
    expect![[r#"window: lines 32..352, shape SingleLine, max_tokens 48, stop ["\n"]"#]]
        .assert_eq(render_request(&first).lines().next().unwrap());
    assert!(first.input.prefix.starts_with("let v32 = 32;\n"));
    assert!(first.input.suffix.ends_with("let v351 = 351;\n"));
    // Moving within the step keeps both window edges; typing only appends to the prefix.
    for line in [290, 300, 310, 319] {
        let p = at(line_start(line));
        assert_eq!((p.prefix_start_line, p.suffix_end_line), (32, 352), "cursor line {line}");
    }
    let mut typed = text.clone();
    typed.insert(line_start(300) + 4, 'x');
    let mut fixture = typed.clone();
    fixture.insert_str(line_start(300) + 5, "$0");
    let next = prepare(&fixture, &[], &Config::default(), &windows);
    assert!(next.input.prefix.starts_with(&first.input.prefix));
    assert_eq!(next.input.suffix, first.input.suffix);
    // The byte caps move the prefix start by whole steps and drop whole suffix lines.
    let small = Windows { prefix_bytes: 1000, suffix_bytes: 100, ..windows };
    let mut fixture = text.clone();
    fixture.insert_str(line_start(300), "$0");
    let p = prepare(&fixture, &[], &Config::default(), &small);
    assert_eq!(p.prefix_start_line % 32, 0);
    assert!(p.input.prefix.len() <= 1000 + 32 * 16, "{}", p.input.prefix.len());
    assert!(p.input.suffix.len() <= 100 && p.input.suffix.ends_with('\n'));
}

/// Runs post-processing on `raw` at the fixture's cursor and shows the edited line(s), or the
/// suppression's reason code.
fn check_post(fixture: &str, raw: &str, max_lines: u32, expect: Expect) {
    let config = Config { max_lines, ..Config::default() };
    let (text, at) = cursor(fixture);
    let p = build(
        &Document::new(text.clone(), 0, "rust".into()),
        at,
        &[],
        &config,
        &Windows::default(),
    );
    let shown = match postprocess(raw, &p.site) {
        Ok(edit) => format!(
            "insert {:?} replacing {} bytes ({:?}) →\n{}{}{}",
            edit.text,
            edit.replace,
            p.site.shape,
            &text[..at],
            edit.text,
            &text[at + edit.replace..]
        ),
        Err(reason) => format!("suppressed: {reason}"),
    };
    // A literal \r would not survive in the snapshot's source: show it.
    expect.assert_eq(&shown.replace('\r', "␍"));
}

#[test]
fn empty_and_whitespace_completions_are_suppressed() {
    check_post("fn f() {\n    $0\n}", "", 8, expect!["suppressed: empty"]);
    check_post("fn f() {\n    $0\n}", "  \n\t ", 8, expect!["suppressed: whitespace"]);
    // Mid-line only the first line counts, and here it is blank.
    check_post("let x = $0y;", "\nfoo", 8, expect!["suppressed: whitespace"]);
}

#[test]
fn mid_line_completions_are_single_line() {
    check_post(
        "fn f() {\n    let x = $0.len();\n}",
        "name\n    let y = 2;",
        8,
        expect![[r#"
            insert "name" replacing 0 bytes (SingleLine) →
            fn f() {
                let x = name.len();
            }"#]],
    );
}

#[test]
fn empty_line_completions_are_multi_line_up_to_max_lines() {
    check_post(
        "fn f() {\n    $0\n}",
        "let a = 1;\n    let b = 2;\n    let c = 3;\n",
        2,
        expect![[r#"
            insert "let a = 1;\n    let b = 2;" replacing 0 bytes (MultiLine) →
            fn f() {
                let a = 1;
                let b = 2;
            }"#]],
    );
}

#[test]
fn text_repeating_the_rest_of_the_line_is_dropped() {
    check_post(
        "let total = $0values.len();",
        "1 + values.len();",
        8,
        expect![[r#"
            insert "1 + " replacing 0 bytes (SingleLine) →
            let total = 1 + values.len();"#]],
    );
    check_post(
        "let total = $0values.len();",
        "values.len();",
        8,
        expect!["suppressed: repeats_suffix"],
    );
}

#[test]
fn lines_repeating_the_next_lines_are_dropped() {
    check_post(
        "fn f() {\n    let a = 1;$0\n    let b = 2;\n}",
        "\n    let c = 3;\n    let b = 2;\n}",
        8,
        expect![[r#"
            insert "\n    let c = 3;" replacing 0 bytes (MultiLine) →
            fn f() {
                let a = 1;
                let c = 3;
                let b = 2;
            }"#]],
    );
    check_post(
        "fn f() {\n    let a = 1;$0\n\n    let b = 2;\n}",
        "\n    let b = 2;",
        8,
        expect!["suppressed: repeats_next_lines"],
    );
    check_post(
        "fn f() {\n    $0\n    let b = 2;\n}",
        "let b = 2;\n}",
        8,
        expect!["suppressed: repeats_next_lines"],
    );
}

#[test]
fn auto_closed_punctuation_is_replaced_through_the_range() {
    check_post(
        "fn f() {\n    run($0)\n}",
        "a, b);",
        8,
        expect![[r#"
            insert "a, b);" replacing 1 bytes (MultiLine) →
            fn f() {
                run(a, b);
            }"#]],
    );
    check_post(
        "fn f() {\n    run($0);\n}",
        "a, b);",
        8,
        expect![[r#"
            insert "a, b);" replacing 2 bytes (MultiLine) →
            fn f() {
                run(a, b);
            }"#]],
    );
    // A closer the completion opens itself is not the editor's.
    check_post(
        "run($0)",
        "inner(1)",
        8,
        expect![[r#"
            insert "inner(1)" replacing 0 bytes (MultiLine) →
            run(inner(1))"#]],
    );
    check_post(
        "let v = vec![$0];",
        "1, 2]",
        8,
        expect![[r#"
            insert "1, 2]" replacing 1 bytes (MultiLine) →
            let v = vec![1, 2];"#]],
    );
    check_post(
        "let s = \"$0\";",
        "hello\";",
        8,
        expect![[r#"
            insert "hello\";" replacing 2 bytes (MultiLine) →
            let s = "hello";"#]],
    );
    check_post(
        "let s = f(\"$0\")",
        "a\", \"b\")",
        8,
        expect![[r#"
            insert "a\", \"b\")" replacing 2 bytes (MultiLine) →
            let s = f("a", "b")"#]],
    );
}

#[test]
fn indentation_follows_the_document() {
    check_post(
        "fn f() {\n\tlet a = 1;\n\t$0\n}",
        "if a > 0 {\n        a += 1;\n    }",
        8,
        expect![[r#"
            insert "if a > 0 {\n\t\ta += 1;\n\t}" replacing 0 bytes (MultiLine) →
            fn f() {
            	let a = 1;
            	if a > 0 {
            		a += 1;
            	}
            }"#]],
    );
    check_post(
        "fn f() {\n  let a = 1;\n  $0\n}",
        "if a > 0 {\n\t\ta += 1;\n\t}",
        8,
        expect![[r#"
            insert "if a > 0 {\n    a += 1;\n  }" replacing 0 bytes (MultiLine) →
            fn f() {
              let a = 1;
              if a > 0 {
                a += 1;
              }
            }"#]],
    );
    assert_eq!(Indent::detect("fn f() {\n  a;\n  if b {\n    c\n  }\n}"), Indent::Spaces(2));
    assert_eq!(Indent::detect("fn f() {\n\ta;\n}"), Indent::Tabs);
    assert_eq!(Indent::detect("fn f() {}"), Indent::Spaces(4));
}

#[test]
fn crlf_documents_get_crlf_completions() {
    check_post(
        "fn f() {\r\n    $0\r\n}\r\n",
        "a();\n    b();",
        8,
        expect![[r#"
            insert "a();\r\n    b();" replacing 0 bytes (MultiLine) →
            fn f() {␍
                a();␍
                b();␍
            }␍
        "#]],
    );
}

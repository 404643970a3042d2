//! The `narq` command line (issue 10.7): help for every sub-command, global options on
//! either side of it, exit code 2 for usage errors, completions and man pages from the same
//! definition.

use crate::util::*;
use std::process::{Command, Output};

/// `narq ARGS` with a config that does not exist, so that a command which got past the
/// parser fails with 1 (not 2) and never reaches a real daemon.
fn narq_alone(args: &[&str]) -> Output {
    output(Command::new(bin("narq")).args(args).env("NARQ_CONFIG", "/nonexistent/narq-cli-test.toml"))
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).to_string()
}

/// Every sub-command and what its `--help` must mention besides `--config`.
const COMMANDS: &[(&str, &[&str])] = &[
    ("daemon", &[]),
    ("push", &["--wait", "<PATH>..."]),
    ("status", &["--json"]),
    ("wait", &["--timeout <SECS>"]),
    ("retry", &[]),
    ("doctor", &[]),
    ("verify", &["--deep", "--repair", "--sigs-needed <N>", "--json"]),
    ("sign", &["--key-file <FILE>", "--all"]),
    ("keygen", &["<NAME>", "--secret-key-file <FILE>", "--public-key-file <FILE>"]),
    ("nar-hash", &["<PATH>"]),
    ("rm", &["--with-referrers", "--dry-run", "<PATH>..."]),
    ("pin", &["<NAME>", "<PATH>"]),
    ("unpin", &["<NAME>"]),
    ("pins", &[]),
    ("gc", &["--keep-days <N>", "--max-size <SIZE>", "--grace <DURATION>", "--dry-run", "--json"]),
    // Listed since issue 21 (they worked but `narq --help` did not show them).
    ("completions", &["<SHELL>"]),
    ("man", &["<DIR>"]),
];

/// Before clap, `narq daemon --help` said "invalid option" and exited 1.
#[test]
fn every_subcommand_has_help() {
    for (cmd, mentions) in COMMANDS {
        for args in [vec![*cmd, "--help"], vec![*cmd, "-h"], vec!["help", *cmd]] {
            let out = narq_alone(&args);
            let help = text(&out.stdout);
            assert_eq!(out.status.code(), Some(0), "narq {args:?}: {}{}", help, text(&out.stderr));
            assert!(help.contains(&format!("Usage: narq {cmd}")), "narq {args:?}:\n{help}");
            for m in mentions.iter().chain(&["--config <FILE>"]) {
                assert!(help.contains(m), "narq {args:?} does not mention {m}:\n{help}");
            }
        }
    }
    // The top level lists every command, the config lookup and the exit codes.
    let out = narq_alone(&["--help"]);
    assert_eq!(out.status.code(), Some(0));
    let help = text(&out.stdout);
    for (cmd, _) in COMMANDS {
        assert!(help.contains(&format!("\n  {cmd} ")), "narq --help does not list {cmd}:\n{help}");
    }
    for m in ["NARQ_CONFIG", "/etc/narq/config.toml", "Exit codes", "3 "] {
        assert!(help.contains(m), "narq --help does not mention {m}:\n{help}");
    }
}

/// `--config` is global: before or after the sub-command, it names the file used.
#[test]
fn config_before_or_after_the_subcommand() {
    let mut n = Narq::new("cli-config", "");
    n.start();
    let config = n.config.to_str().unwrap();
    for args in [
        vec!["--config", config, "status", "--json"],
        vec!["status", "--json", "--config", config],
        vec!["status", &format!("--config={config}"), "--json"],
        vec!["wait", "--config", config, "--timeout", "10"],
    ] {
        // No NARQ_CONFIG: only the option can lead to the daemon.
        let out = output(Command::new(bin("narq")).args(&args).env_remove("NARQ_CONFIG"));
        assert_eq!(out.status.code(), Some(0), "narq {args:?}: {}", text(&out.stderr));
        if args.contains(&"--json") {
            let s: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
            assert_eq!(s["pending"], 0, "{s}");
        }
    }
    // And it wins over $NARQ_CONFIG: a missing file given after the command is an error naming it.
    let out = n.narq(&["status", "--config", "/nonexistent/other.toml"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains("/nonexistent/other.toml"), "{}", text(&out.stderr));
}

/// Usage errors exit 2 (before clap `push --bogus` and `wait --timeout x` exited 1, and
/// `wait --timeout=-1` panicked), say what is wrong once, print nothing on stdout and run
/// nothing (the config does not exist, so anything that ran would exit 1).
#[test]
fn usage_errors_exit_2() {
    let cases: &[(&[&str], &str)] = &[
        (&["push", "--bogus", "/nix/store/00000000000000000000000000000000-x"], "--bogus"),
        (&["wait", "--timeout", "x"], "invalid float literal"),
        (&["wait", "--timeout=-1"], "from 0"),
        (&["wait", "--timeout", "-1"], "-1"),
        (&["wait", "--timeout=inf"], "inf"),
        (&["wait", "--timeout"], "--timeout"),
        (&["frobnicate"], "frobnicate"),
        // No command: the whole help, on stderr.
        (&[], "Usage: narq"),
        (&["--config"], "--config"),
        (&["push"], "<PATH>"),
        (&["push", "--wait"], "<PATH>"),
        (&["keygen", "name"], "--secret-key-file"),
        (&["keygen", "name", "--secret-key-file", "/tmp/x.sec"], "--public-key-file"),
        (&["nar-hash"], "<PATH>"),
        (&["nar-hash", "/a", "/b"], "/b"),
        (&["daemon", "extra"], "extra"),
        (&["retry", "--now"], "--now"),
        (&["status", "--json=yes"], "--json"),
    ];
    for (args, why) in cases {
        let out = narq_alone(args);
        let err = text(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "narq {args:?}: {err}");
        assert!(out.stdout.is_empty(), "narq {args:?} printed on stdout: {}", text(&out.stdout));
        assert!(err.contains(why), "narq {args:?} does not say {why:?}: {err}");
        let first = err.lines().next().unwrap_or_default();
        assert!(first.starts_with("error: ") || args.is_empty(), "narq {args:?}: {err}");
    }
    // Each thing once: not "invalid float literal: invalid float literal".
    let err = text(&narq_alone(&["wait", "--timeout", "x"]).stderr);
    assert_eq!(err.matches("invalid float literal").count(), 1, "{err}");
}

/// Errors once parsing succeeded are 1, in one line; `--version` is 0.
#[test]
fn runtime_errors_exit_1_in_one_line() {
    let out = narq_alone(&["status"]);
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.starts_with("narq: ") && err.contains("/nonexistent/narq-cli-test.toml"), "{err}");

    let out = narq_alone(&["nar-hash", "/nonexistent/path"]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(text(&out.stderr).lines().count(), 1, "{}", text(&out.stderr));

    let out = narq_alone(&["--version"]);
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(text(&out.stdout).trim(), format!("narq {}", env!("CARGO_PKG_VERSION")));
}

/// Completions and man pages come from the same definition as the parser: bash completes
/// sub-commands and their options; every sub-command has a man page naming its options.
#[test]
fn completions_and_man_pages() {
    let t = TempDir::new("cli-gen");
    for shell in ["bash", "zsh", "fish", "elvish", "powershell"] {
        let out = narq_alone(&["completions", shell]);
        assert_eq!(out.status.code(), Some(0), "{shell}: {}", text(&out.stderr));
        let script = text(&out.stdout);
        assert!(script.contains("nar-hash") && script.contains("timeout"), "{shell}:\n{script}");
    }
    let bash = t.join("narq.bash");
    std::fs::write(&bash, narq_alone(&["completions", "bash"]).stdout).unwrap();
    // What bash offers, called as bash calls it: command, current word, previous word.
    let complete = |words: &str| {
        let script = format!(
            "source {}; COMP_WORDS=({words}); COMP_CWORD=$((${{#COMP_WORDS[@]}} - 1)); \
             COMP_LINE=\"${{COMP_WORDS[*]}}\"; COMP_POINT=${{#COMP_LINE}}; _narq narq \"${{COMP_WORDS[COMP_CWORD]}}\" \"${{COMP_WORDS[COMP_CWORD-1]}}\"; echo \"${{COMPREPLY[*]}}\"",
            bash.display()
        );
        run(Command::new("bash").args(["--norc", "-c", &script])).trim().to_string()
    };
    assert_eq!(complete("narq wa"), "wait");
    assert_eq!(complete("narq ke"), "keygen");
    assert_eq!(complete("narq wait --t"), "--timeout");
    assert!(complete("narq push --").contains("--wait"));

    let man = t.join("man");
    std::fs::create_dir(&man).unwrap();
    let out = narq_alone(&["man", man.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let page = |name: &str| std::fs::read_to_string(man.join(name)).unwrap_or_else(|e| panic!("{name}: {e}"));
    let top = page("narq.1");
    assert!(top.contains(".TH narq 1") && top.contains("NARQ_CONFIG"), "{top}");
    for (cmd, mentions) in COMMANDS {
        let p = page(&format!("narq-{cmd}.1"));
        assert!(p.contains(&format!(".TH narq-{cmd} 1")), "{p}");
        for m in mentions.iter().chain(&["--config"]) {
            // roff escapes dashes; an option is `\-\-name`.
            let word = m.split(' ').next().unwrap().trim_start_matches('<').trim_end_matches("...").trim_end_matches('>');
            assert!(p.contains(&word.replace('-', "\\-")), "narq-{cmd}.1 does not mention {word}:\n{p}");
        }
    }
    let mut names: Vec<String> = std::fs::read_dir(&man).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().to_string()).collect();
    names.sort();
    assert_eq!(names.len(), COMMANDS.len() + 1, "{names:?}");
}

//! `banger completion SHELL`: the script bash sources registers banger's
//! completion and completes subcommands and flags; the other shells'
//! scripts are parsed by their shells where those are installed.

use std::path::PathBuf;
use std::process::Command;

use test_infra::{not_run_here, text};

fn banger_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_banger"))
}

fn script(shell: &str) -> String {
    let out = Command::new(banger_bin())
        .args(["completion", shell])
        .output()
        .expect("run banger completion");
    assert!(out.status.success(), "{}", text(&out.stderr));
    text(&out.stdout)
}

/// What bash's completion offers for the words typed so far.
fn complete(script: &std::path::Path, words: &[&str]) -> Vec<String> {
    let words_list = words
        .iter()
        .map(|w| format!("'{w}'"))
        .collect::<Vec<_>>()
        .join(" ");
    let cur = words.last().copied().unwrap_or("");
    let prev = words
        .get(words.len().saturating_sub(2))
        .copied()
        .unwrap_or("");
    let prog = format!(
        "source '{}' && complete -p banger >/dev/null && COMP_WORDS=({words_list}) && \
         COMP_CWORD={} && _banger banger '{cur}' '{prev}' && printf '%s\\n' \"${{COMPREPLY[@]}}\"",
        script.display(),
        words.len() - 1
    );
    let out = Command::new("bash")
        .args(["-c", &prog])
        .output()
        .expect("bash");
    assert!(out.status.success(), "bash: {}", text(&out.stderr));
    text(&out.stdout).lines().map(str::to_string).collect()
}

#[test]
fn bash_completes_subcommands_and_flags() {
    let d = tempfile::tempdir().unwrap();
    let f = d.path().join("banger.bash");
    std::fs::write(&f, script("bash")).unwrap();
    let st = Command::new("bash").arg("-n").arg(&f).status().unwrap();
    assert!(st.success(), "bash cannot parse the script");
    let top = complete(&f, &["banger", ""]);
    for c in ["vm", "image", "volume", "doctor", "completion"] {
        assert!(top.iter().any(|w| w == c), "{c} missing from {top:?}");
    }
    assert_eq!(complete(&f, &["banger", "vm", "ru"]), vec!["run"]);
    let flags = complete(&f, &["banger", "vm", "run", "--mem"]);
    assert!(flags.iter().any(|w| w == "--memory"), "{flags:?}");
}

#[test]
fn other_shells_scripts_parse() {
    for (shell, check) in [("zsh", vec!["-n"]), ("fish", vec!["--no-execute"])] {
        let s = script(shell);
        assert!(s.contains("banger"), "{shell}: {s}");
        if Command::new(shell).arg("--version").output().is_err() {
            not_run_here(
                &format!("completion::{shell} parses its script"),
                &format!("{shell} is not installed here; the script was generated but not parsed"),
            );
            continue;
        }
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("banger.completion");
        std::fs::write(&f, &s).unwrap();
        let out = Command::new(shell).args(&check).arg(&f).output().unwrap();
        assert!(out.status.success(), "{shell}: {}", text(&out.stderr));
    }
}

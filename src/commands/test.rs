//! `test`: run `hosts/<host>/tests/T*.sh` in order, each under its own timeout, streaming
//! test-progress and finishing with `running:false` before the final status (contract §9.6).
//!
//! A test that hangs is killed and reported as TIMEOUT; the remaining tests still run. Markers
//! are ASCII (`PASS`, `FAIL`) because the dashboard strips everything else.

use std::path::PathBuf;

use super::{Context, require_repo};
use crate::config::human_duration;
use crate::dashboard::{Outcome, TestProgress};
use crate::exec::Cmd;

fn test_scripts(dir: &std::path::Path) -> Option<Vec<PathBuf>> {
    let entries = std::fs::read_dir(dir).ok()?;
    let mut scripts: Vec<PathBuf> = entries
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| {
            p.is_file()
                && p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with('T') && n.ends_with(".sh"))
        })
        .collect();
    // The shell's glob order: bytewise.
    scripts.sort();
    Some(scripts)
}

fn progress(current: u32, total: u32, passed: u32, running: bool) -> TestProgress {
    TestProgress {
        current,
        total,
        passed,
        running,
        result: None,
        comment: None,
    }
}

pub(super) async fn run_tests(ctx: &Context) {
    let Some(repo) = require_repo(ctx, "Test") else {
        return;
    };
    let tests_dir = repo.join("hosts").join(ctx.host()).join("tests");
    let scripts = match test_scripts(&tests_dir) {
        None => {
            no_tests(ctx, "Test: No tests found");
            return;
        }
        Some(s) if s.is_empty() => {
            no_tests(ctx, "Test: No test scripts found");
            return;
        }
        Some(s) => s,
    };
    let total = scripts.len() as u32;
    let timeout = ctx.settings.timeouts.test;
    ctx.progress(progress(0, total, 0, true));
    let mut passed = 0u32;
    let mut failed = 0u32;
    let mut lines = Vec::new();
    let mut first_failure: Option<String> = None;
    for (index, script) in scripts.iter().enumerate() {
        let name = script
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        ctx.progress(progress(index as u32 + 1, total, passed, true));
        let result = ctx
            .run(Cmd::new(script.as_os_str(), &repo, timeout, name.clone()))
            .await;
        if result.ok {
            passed += 1;
            lines.push(format!("PASS {name}"));
        } else {
            failed += 1;
            if result.timed_out {
                lines.push(format!(
                    "FAIL {name}: TIMEOUT (exceeded {})",
                    human_duration(timeout)
                ));
                first_failure.get_or_insert_with(|| format!("{name} timed out"));
            } else {
                // The text: the output, after "killed by signal N" for a crash, or what
                // failed to start, or the exit code when the script printed nothing.
                let detail: String = result.text.replace('\n', " ").chars().take(100).collect();
                lines.push(format!("FAIL {name}: {detail}"));
                first_failure.get_or_insert_with(|| format!("{name} failed"));
            }
        }
        if result.cancelled {
            lines.push("Test run interrupted: the agent is shutting down".into());
            break;
        }
    }
    let summary = if failed > 0 {
        format!("{passed}/{total} pass, {failed} fail")
    } else {
        format!("{passed}/{total} pass")
    };
    ctx.progress(TestProgress {
        current: total,
        total,
        passed,
        running: false,
        result: Some(summary.clone()),
        comment: first_failure,
    });
    let body = lines.join("\n");
    if failed == 0 {
        ctx.status(Outcome::Ok, &format!("Test: {body}"), Some(summary));
    } else {
        ctx.status(
            Outcome::Error,
            &format!("Test failed: {body}"),
            Some(summary),
        );
    }
}

fn no_tests(ctx: &Context, message: &str) {
    ctx.progress(TestProgress {
        current: 0,
        total: 0,
        passed: 0,
        running: false,
        result: Some("no tests".into()),
        comment: None,
    });
    ctx.status(Outcome::Ok, message, Some("no tests".into()));
}

//! Whether the host must reboot to finish a switch: NixOS activates a new system at once, but
//! the kernel, initrd and kernel modules in use stay those of the system it booted. So the
//! booted system (`/run/booted-system`) and the current one (`/run/current-system`) are
//! compared by where their `kernel`, `initrd` and `kernel-modules` links resolve.
//!
//! Only `readlink`/`stat` work, no child process, so it may run on any heartbeat; it runs at
//! start and after each switch. Hosts without a booted-system link (macOS, other distributions)
//! never need a reboot by this rule.

use std::path::{Path, PathBuf};

/// What is compared, and how it is named in reports.
const PARTS: [(&str, &str); 3] = [
    ("kernel", "kernel"),
    ("initrd", "initrd"),
    ("kernel-modules", "kernel modules"),
];

/// A pending reboot: which parts differ between the booted and the current system.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RebootNeeded {
    pub parts: Vec<&'static str>,
}

impl RebootNeeded {
    /// "kernel, initrd and kernel modules"
    pub fn parts_text(&self) -> String {
        match self.parts.as_slice() {
            [] => String::new(),
            [one] => (*one).to_string(),
            [init @ .., last] => format!("{} and {last}", init.join(", ")),
        }
    }

    /// The sentence used in reports, `STATUS=` and `nixfleet-agent status`.
    pub fn sentence(&self) -> String {
        format!(
            "reboot needed: the running {} differ from the current system's",
            self.parts_text()
        )
    }
}

fn resolve(root: &Path, part: &str) -> Option<PathBuf> {
    root.join(part).canonicalize().ok()
}

/// Compares `booted` and `current` (system roots, normally `/run/booted-system` and
/// `/run/current-system`). `None` when they agree, or when either cannot be read (not NixOS).
pub fn check(booted: &Path, current: &Path) -> Option<RebootNeeded> {
    let booted_root = booted.canonicalize().ok()?;
    let current_root = current.canonicalize().ok()?;
    if booted_root == current_root {
        return None;
    }
    let parts: Vec<_> = PARTS
        .iter()
        .filter(|(link, _)| {
            let (b, c) = (resolve(&booted_root, link), resolve(&current_root, link));
            // A part that exists on only one side changed too; absent on both is no change.
            (b.is_some() || c.is_some()) && b != c
        })
        .map(|(_, name)| *name)
        .collect();
    (!parts.is_empty()).then_some(RebootNeeded { parts })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    /// A fake store with two systems sharing or not sharing kernel, initrd and modules.
    fn system(store: &Path, name: &str, kernel: &str, initrd: &str, modules: &str) -> PathBuf {
        let sys = store.join(name);
        std::fs::create_dir_all(&sys).unwrap();
        for (link, target) in [
            ("kernel", kernel),
            ("initrd", initrd),
            ("kernel-modules", modules),
        ] {
            let target = store.join(target);
            std::fs::create_dir_all(&target).unwrap();
            symlink(&target, sys.join(link)).unwrap();
        }
        sys
    }

    #[test]
    fn same_kernel_initrd_and_modules_need_no_reboot() {
        let dir = tempfile::tempdir().unwrap();
        let a = system(dir.path(), "sys-a", "k1", "i1", "m1");
        let b = system(dir.path(), "sys-b", "k1", "i1", "m1");
        let booted = dir.path().join("booted-system");
        symlink(&a, &booted).unwrap();
        assert_eq!(check(&booted, &booted), None, "same system");
        assert_eq!(check(&booted, &b), None, "new system, same kernel parts");
    }

    #[test]
    fn a_new_kernel_or_initrd_needs_a_reboot_and_says_which() {
        let dir = tempfile::tempdir().unwrap();
        let a = system(dir.path(), "sys-a", "k1", "i1", "m1");
        let b = system(dir.path(), "sys-b", "k2", "i2", "m1");
        let c = system(dir.path(), "sys-c", "k2", "i2", "m2");
        let needed = check(&a, &b).unwrap();
        assert_eq!(needed.parts, vec!["kernel", "initrd"]);
        assert_eq!(
            needed.sentence(),
            "reboot needed: the running kernel and initrd differ from the current system's"
        );
        assert_eq!(
            check(&a, &c).unwrap().parts_text(),
            "kernel, initrd and kernel modules"
        );
    }

    #[test]
    fn no_booted_system_is_not_nixos_and_needs_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let a = system(dir.path(), "sys-a", "k1", "i1", "m1");
        assert_eq!(check(&dir.path().join("absent"), &a), None);
        assert_eq!(check(&a, &dir.path().join("absent")), None);
    }
}

//! Finding the native libraries a GPU backend loads at run time, before the backend tries and
//! panics: a missing driver becomes an error that names the library and what provides it.

use std::path::{Path, PathBuf};

/// Directories the dynamic loader searches, in its order: `LD_LIBRARY_PATH`, the directories of
/// `/etc/ld.so.conf` (and its `include`d files), then the usual system directories.
pub fn loader_directories() -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::env::var("LD_LIBRARY_PATH")
        .unwrap_or_default()
        .split(':')
        .filter(|d| !d.is_empty())
        .map(PathBuf::from)
        .collect();
    read_loader_conf(Path::new("/etc/ld.so.conf"), &mut dirs, 0);
    for d in [
        "/lib",
        "/usr/lib",
        "/lib64",
        "/usr/lib64",
        "/lib/x86_64-linux-gnu",
        "/usr/lib/x86_64-linux-gnu",
        "/lib/aarch64-linux-gnu",
        "/usr/lib/aarch64-linux-gnu",
        "/usr/local/cuda/lib64",
        "/usr/lib/wsl/lib",
    ] {
        dirs.push(PathBuf::from(d));
    }
    dirs
}

fn read_loader_conf(path: &Path, dirs: &mut Vec<PathBuf>, depth: usize) {
    let Ok(text) = std::fs::read_to_string(path) else {
        return;
    };
    for line in text.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        if let Some(pattern) = line.strip_prefix("include ") {
            // `include /etc/ld.so.conf.d/*.conf`: only a trailing `*.conf` glob is used.
            let pattern = Path::new(pattern.trim());
            let (Some(dir), Some(name)) = (pattern.parent(), pattern.file_name()) else {
                continue;
            };
            let suffix = name.to_string_lossy().trim_start_matches('*').to_string();
            let Ok(entries) = std::fs::read_dir(dir) else {
                continue;
            };
            let mut files: Vec<PathBuf> = entries
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.to_string_lossy().ends_with(&suffix))
                .collect();
            files.sort();
            if depth < 4 {
                for f in files {
                    read_loader_conf(&f, dirs, depth + 1);
                }
            }
        } else {
            dirs.push(PathBuf::from(line));
        }
    }
}

/// The first file in `dirs` named `prefix` or `prefix.<version>` (`libnvrtc.so` finds
/// `libnvrtc.so.12`).
pub fn find_library(prefix: &str, dirs: &[PathBuf]) -> Option<PathBuf> {
    for dir in dirs {
        let exact = dir.join(prefix);
        if exact.exists() {
            return Some(exact);
        }
        let Ok(entries) = std::fs::read_dir(dir) else {
            continue;
        };
        let mut found: Vec<PathBuf> = entries
            .filter_map(|e| e.ok())
            .filter(|e| {
                e.file_name()
                    .to_str()
                    .is_some_and(|n| n.starts_with(&format!("{prefix}.")))
            })
            .map(|e| e.path())
            .collect();
        found.sort();
        if let Some(first) = found.into_iter().next() {
            return Some(first);
        }
    }
    None
}

/// What a CUDA device needs: the driver's `libcuda.so.1` and NVRTC (CUDA's runtime compiler,
/// which cubecl uses to compile its kernels). Err names the first one missing.
pub fn check_cuda(dirs: &[PathBuf]) -> Result<(), String> {
    if find_library("libcuda.so.1", dirs).is_none() {
        return Err(
            "libcuda.so.1 (the NVIDIA driver's CUDA library) was not found in \
                    LD_LIBRARY_PATH or the loader's directories: install the NVIDIA driver"
                .into(),
        );
    }
    if find_library("libnvrtc.so", dirs).is_none() {
        return Err(
            "libnvrtc.so (NVRTC, CUDA's runtime compiler, from the CUDA toolkit or the \
                    cuda-nvrtc package) was not found in LD_LIBRARY_PATH or the loader's \
                    directories"
                .into(),
        );
    }
    Ok(())
}

/// What wgpu needs on Linux: the Vulkan loader, and at least one Vulkan driver (an ICD
/// manifest in `icd_dirs`, or one named by `VK_ICD_FILENAMES` / `VK_DRIVER_FILES`).
pub fn check_vulkan(lib_dirs: &[PathBuf], icd_dirs: &[PathBuf]) -> Result<(), String> {
    if find_library("libvulkan.so.1", lib_dirs).is_none() {
        return Err(
            "libvulkan.so.1 (the Vulkan loader; Debian package libvulkan1) was not \
                    found in LD_LIBRARY_PATH or the loader's directories"
                .into(),
        );
    }
    let named = ["VK_ICD_FILENAMES", "VK_DRIVER_FILES"]
        .iter()
        .any(|v| std::env::var_os(v).is_some_and(|s| !s.is_empty()));
    let installed = icd_dirs.iter().any(|d| {
        std::fs::read_dir(d).is_ok_and(|entries| {
            entries
                .filter_map(|e| e.ok())
                .any(|e| e.path().extension().is_some_and(|x| x == "json"))
        })
    });
    if !named && !installed {
        return Err(format!(
            "no Vulkan driver is installed (no ICD manifest in {}): on an NVIDIA GPU the driver \
             provides nvidia_icd.json; on a CPU, Mesa's lavapipe (Debian package \
             mesa-vulkan-drivers)",
            icd_dirs
                .iter()
                .map(|d| d.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    Ok(())
}

/// Where Vulkan's loader looks for driver manifests on Linux.
pub fn vulkan_icd_directories() -> Vec<PathBuf> {
    let mut dirs = Vec::new();
    if let Some(home) = std::env::var_os("HOME") {
        dirs.push(PathBuf::from(home).join(".local/share/vulkan/icd.d"));
    }
    for d in [
        "/etc/vulkan/icd.d",
        "/usr/local/share/vulkan/icd.d",
        "/usr/share/vulkan/icd.d",
    ] {
        dirs.push(PathBuf::from(d));
    }
    dirs
}

#[cfg(test)]
mod tests {
    use super::*;

    fn touch(dir: &Path, name: &str) {
        std::fs::write(dir.join(name), b"").unwrap();
    }

    #[test]
    fn cuda_check_names_the_missing_library() {
        let dir = tempfile::tempdir().unwrap();
        let dirs = vec![dir.path().to_path_buf()];
        let err = check_cuda(&dirs).unwrap_err();
        assert!(err.starts_with("libcuda.so.1"), "{err}");
        touch(dir.path(), "libcuda.so.1");
        let err = check_cuda(&dirs).unwrap_err();
        assert!(err.starts_with("libnvrtc.so"), "{err}");
        touch(dir.path(), "libnvrtc.so.12");
        check_cuda(&dirs).unwrap();
    }

    #[test]
    fn vulkan_check_names_the_loader_then_the_driver() {
        let libs = tempfile::tempdir().unwrap();
        let icds = tempfile::tempdir().unwrap();
        let (lib_dirs, icd_dirs) = (vec![libs.path().into()], vec![icds.path().into()]);
        let err = check_vulkan(&lib_dirs, &icd_dirs).unwrap_err();
        assert!(err.starts_with("libvulkan.so.1"), "{err}");
        touch(libs.path(), "libvulkan.so.1");
        if std::env::var_os("VK_ICD_FILENAMES").is_none()
            && std::env::var_os("VK_DRIVER_FILES").is_none()
        {
            let err = check_vulkan(&lib_dirs, &icd_dirs).unwrap_err();
            assert!(err.contains("no Vulkan driver"), "{err}");
            assert!(err.contains(&icds.path().display().to_string()), "{err}");
        }
        touch(icds.path(), "nvidia_icd.json");
        check_vulkan(&lib_dirs, &icd_dirs).unwrap();
    }

    #[test]
    fn the_loader_directories_find_libc() {
        assert!(find_library("libc.so.6", &loader_directories()).is_some());
    }
}

//! The run-time build: NVRTC compiles a registered source to a cubin for one architecture, with an on-disk
//! cache, and the ptxas report of the build is parsed into per-kernel resources.
//!
//! NVRTC needs no GPU, only `libnvrtc.so.13` (on `LD_LIBRARY_PATH`) and the CUDA headers `cuda_bf16.h` & co.
//! (found through [`find_include_dir`]). The cache key is the SHA-256 of the source, the in-memory headers, the
//! architecture, every compiler option and the NVRTC version; an entry is written to a temporary file and renamed
//! into place, and carries its own SHA-256, so a torn or corrupt entry is detected and rebuilt, never loaded.

use std::ffi::{c_char, c_int, CString};
use std::fmt;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use cudarc::nvrtc::{result as nvrtc_result, sys as nvrtc_sys};
use sha2::{Digest, Sha256};

use super::error::{CudaError, Result};
use super::registry::KernelSource;

/// In-memory headers every source may `#include "name"`: (include name, text).
pub const HEADERS: &[(&str, &str)] = &[("common.cuh", include_str!("../../cuda/common.cuh"))];

/// The environment variable naming the directory that holds `cuda_bf16.h` (overrides the search).
pub const INCLUDE_ENV: &str = "BATON_CUDA_INCLUDE";
/// The environment variable naming the kernel cache directory.
pub const CACHE_ENV: &str = "BATON_KERNEL_CACHE";

/// Magic bytes opening a cache entry (bump the digit when the layout changes).
const CACHE_MAGIC: &[u8; 8] = b"BATONKC1";
/// A cache entry larger than this is not trusted (a cubin of this crate is a few hundred KiB).
const CACHE_ENTRY_BYTES_MAX: u64 = 256 << 20;

/// A GPU architecture (compute capability) to compile for, e.g. `sm_90` for Hopper.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Arch {
    /// Major compute capability (9 for Hopper).
    pub major: u32,
    /// Minor compute capability.
    pub minor: u32,
}

impl Arch {
    /// Hopper (H100, H200).
    pub const SM90: Arch = Arch { major: 9, minor: 0 };
    /// Ampere (A100).
    pub const SM80: Arch = Arch { major: 8, minor: 0 };
}

impl fmt::Display for Arch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sm_{}{}", self.major, self.minor)
    }
}

/// How to build: where the headers and the cache are, and any extra NVRTC options.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BuildOptions {
    /// The directory holding `cuda_bf16.h`; `None` builds without an include path (a bf16 source then fails).
    pub include_dir: Option<PathBuf>,
    /// The cache directory; `None` disables the on-disk cache.
    pub cache_dir: Option<PathBuf>,
    /// Options appended to the defaults of [`nvrtc_options`] (e.g. `-lineinfo`).
    pub extra_options: Vec<String>,
}

impl BuildOptions {
    /// The options this process should use: headers from [`find_include_dir`], cache from [`default_cache_dir`].
    pub fn from_env() -> Self {
        BuildOptions {
            include_dir: find_include_dir(),
            cache_dir: default_cache_dir(),
            extra_options: Vec::new(),
        }
    }
}

/// Resources of one kernel as reported by ptxas (`--ptxas-options=-v`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KernelResources {
    /// The entry point.
    pub kernel: String,
    /// Registers per thread.
    pub registers: u32,
    /// Static shared memory per block, bytes.
    pub smem_bytes: u32,
    /// Stack frame per thread, bytes (local memory, e.g. a register array indexed at run time).
    pub stack_bytes: u32,
    /// Bytes of register spill stores per thread.
    pub spill_stores: u32,
    /// Bytes of register spill loads per thread.
    pub spill_loads: u32,
}

impl KernelResources {
    /// Whether the kernel spills registers to local memory.
    pub fn spills(&self) -> bool {
        self.spill_stores > 0 || self.spill_loads > 0
    }
}

/// A compiled source: the cubin for one architecture and the compiler's log.
#[derive(Clone, Debug)]
pub struct Compiled {
    /// The registry name of the source.
    pub name: &'static str,
    /// The architecture the cubin is for.
    pub arch: Arch,
    /// The cubin (an ELF image the driver loads with `cuModuleLoadData`).
    pub cubin: Vec<u8>,
    /// NVRTC's program log: warnings and the ptxas report.
    pub log: String,
    /// Whether the cubin came from the on-disk cache.
    pub from_cache: bool,
}

impl Compiled {
    /// Per-kernel registers, shared memory and spills, parsed from [`Compiled::log`].
    pub fn resources(&self) -> Vec<KernelResources> {
        parse_ptxas_log(&self.log)
    }
}

/// `Ok` when `libnvrtc` can be loaded; [`CudaError::NvrtcMissing`] otherwise. Checked once per process; every
/// NVRTC call of this crate goes through it first (cudarc panics when it loads a missing library).
pub fn nvrtc_available() -> Result<()> {
    static PRESENT: OnceLock<bool> = OnceLock::new();
    // SAFETY: `is_culib_present` only tries to dlopen the candidate library names; it calls nothing in them.
    let present = *PRESENT.get_or_init(|| unsafe { nvrtc_sys::is_culib_present() });
    if present {
        Ok(())
    } else {
        Err(CudaError::NvrtcMissing(
            "no libnvrtc.so (or libnvrtc.so.13) on the library search path".into(),
        ))
    }
}

/// NVRTC's version, e.g. `(13, 0)`.
pub fn nvrtc_version() -> Result<(i32, i32)> {
    nvrtc_available()?;
    let (mut major, mut minor): (c_int, c_int) = (0, 0);
    // SAFETY: the library is loaded (checked above) and both pointers are valid for writes.
    unsafe { nvrtc_sys::nvrtcVersion(&mut major, &mut minor) }
        .result()
        .map_err(|e| CudaError::NvrtcMissing(format!("nvrtcVersion failed: {e}")))?;
    Ok((major, minor))
}

/// The directory holding `cuda_bf16.h`: `$BATON_CUDA_INCLUDE` if set, else the first of
/// `<dir>/../include` for each `LD_LIBRARY_PATH` entry, the pip layout `target/nvrtc/nvidia/cu13/include` of this
/// workspace, `nvidia/cu13/include` under each Python `site-packages`, `$CUDA_HOME/include`,
/// `/usr/local/cuda/include`, that contains the header. Searched once per process.
pub fn find_include_dir() -> Option<PathBuf> {
    static FOUND: OnceLock<Option<PathBuf>> = OnceLock::new();
    FOUND
        .get_or_init(|| {
            if let Some(dir) = std::env::var_os(INCLUDE_ENV) {
                return Some(PathBuf::from(dir));
            }
            include_candidates()
                .into_iter()
                .find(|d| d.join("cuda_bf16.h").is_file())
        })
        .clone()
}

fn include_candidates() -> Vec<PathBuf> {
    let mut dirs = Vec::new();
    if let Some(paths) = std::env::var_os("LD_LIBRARY_PATH") {
        for lib in std::env::split_paths(&paths) {
            dirs.push(lib.join("../include"));
        }
    }
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    dirs.push(workspace.join("target/nvrtc/nvidia/cu13/include"));
    for site in python_site_dirs() {
        dirs.push(site.join("nvidia/cu13/include"));
        dirs.push(site.join("nvidia/cuda_runtime/include"));
    }
    if let Some(home) = std::env::var_os("CUDA_HOME") {
        dirs.push(PathBuf::from(home).join("include"));
    }
    dirs.push(PathBuf::from("/usr/local/cuda/include"));
    dirs
}

/// Python's `site-packages` directories (empty when `python3` is not there).
fn python_site_dirs() -> Vec<PathBuf> {
    let script = "import site,sys; print('\\n'.join(site.getsitepackages()+[site.getusersitepackages()]))";
    match std::process::Command::new("python3").args(["-c", script]).output() {
        Ok(out) if out.status.success() => String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| !l.is_empty())
            .map(PathBuf::from)
            .collect(),
        _ => Vec::new(),
    }
}

/// The kernel cache directory: `$BATON_KERNEL_CACHE`, else `$XDG_CACHE_HOME/baton/kernels`, else
/// `$HOME/.cache/baton/kernels`; `None` when none of them is set.
pub fn default_cache_dir() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os(CACHE_ENV) {
        return Some(PathBuf::from(dir));
    }
    if let Some(dir) = std::env::var_os("XDG_CACHE_HOME") {
        return Some(PathBuf::from(dir).join("baton/kernels"));
    }
    std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".cache/baton/kernels"))
}

/// The NVRTC options of a build: `--gpu-architecture=sm_XX --std=c++17 --ptxas-options=-v`, the include path, then
/// `opts.extra_options`.
pub fn nvrtc_options(arch: Arch, opts: &BuildOptions) -> Vec<String> {
    let mut o = vec![
        format!("--gpu-architecture={arch}"),
        "--std=c++17".to_string(),
        "--ptxas-options=-v".to_string(),
    ];
    if let Some(dir) = &opts.include_dir {
        o.push(format!("--include-path={}", dir.display()));
    }
    o.extend(opts.extra_options.iter().cloned());
    o
}

/// Compiles `source` to a cubin for `arch`, or takes it from the cache. Returns [`CudaError::NvrtcMissing`]
/// when NVRTC cannot be loaded and [`CudaError::Compile`] (with the full log) when NVRTC rejects the source.
pub fn compile(source: &KernelSource, arch: Arch, opts: &BuildOptions) -> Result<Compiled> {
    let version = nvrtc_version()?;
    let options = nvrtc_options(arch, opts);
    let key = cache_key(source, arch, &options, version);
    let entry = opts
        .cache_dir
        .as_ref()
        .map(|d| d.join(format!("{}-{arch}-{key}.cubin", source.name)));
    if let Some(path) = &entry {
        if let Some((log, cubin)) = read_entry(path) {
            return Ok(Compiled {
                name: source.name,
                arch,
                cubin,
                log,
                from_cache: true,
            });
        }
    }
    let (log, cubin) = nvrtc_build(source, arch, &options)?;
    if let Some(path) = &entry {
        write_entry(path, &log, &cubin)?;
    }
    Ok(Compiled {
        name: source.name,
        arch,
        cubin,
        log,
        from_cache: false,
    })
}

/// Hex SHA-256 over everything that determines the cubin.
fn cache_key(source: &KernelSource, arch: Arch, options: &[String], version: (i32, i32)) -> String {
    let mut h = Sha256::new();
    let mut field = |bytes: &[u8]| {
        h.update((bytes.len() as u64).to_le_bytes());
        h.update(bytes);
    };
    field(source.name.as_bytes());
    field(source.source.as_bytes());
    for (name, text) in HEADERS {
        field(name.as_bytes());
        field(text.as_bytes());
    }
    field(arch.to_string().as_bytes());
    for o in options {
        field(o.as_bytes());
    }
    field(format!("nvrtc {}.{}", version.0, version.1).as_bytes());
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

/// Runs NVRTC: (program log, cubin).
fn nvrtc_build(source: &KernelSource, arch: Arch, options: &[String]) -> Result<(String, Vec<u8>)> {
    let fail = |reason: String, log: String| CudaError::Compile {
        source_name: source.name.to_string(),
        arch: arch.to_string(),
        reason,
        log,
    };
    let nul = |what: &str| fail(format!("{what} contains a NUL byte"), String::new());
    let src = CString::new(source.source).map_err(|_| nul("the source"))?;
    let name = CString::new(format!("{}.cu", source.name)).map_err(|_| nul("the name"))?;
    let header_texts = HEADERS
        .iter()
        .map(|(_, t)| CString::new(*t))
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|_| nul("a header"))?;
    let header_names = HEADERS
        .iter()
        .map(|(n, _)| CString::new(*n))
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|_| nul("a header name"))?;
    if options.iter().any(|o| o.contains('\0')) {
        return Err(nul("an option"));
    }
    let text_ptrs: Vec<*const c_char> = header_texts.iter().map(|c| c.as_ptr()).collect();
    let name_ptrs: Vec<*const c_char> = header_names.iter().map(|c| c.as_ptr()).collect();
    let mut prog: nvrtc_sys::nvrtcProgram = std::ptr::null_mut();
    // SAFETY: NVRTC is loaded (compile checked nvrtc_version); every pointer is a NUL-terminated string that lives
    // until the call returns (NVRTC copies them), and the two header arrays have HEADERS.len() entries.
    unsafe {
        nvrtc_sys::nvrtcCreateProgram(
            &mut prog,
            src.as_ptr(),
            name.as_ptr(),
            HEADERS.len() as c_int,
            text_ptrs.as_ptr(),
            name_ptrs.as_ptr(),
        )
    }
    .result()
    .map_err(|e| fail(format!("nvrtcCreateProgram: {e}"), String::new()))?;
    let program = Program(prog);
    // SAFETY: `program.0` is a live program; the options are NUL-free (checked above).
    let compiled = unsafe { nvrtc_result::compile_program(program.0, options) };
    // SAFETY: `program.0` is a live program.
    let log = unsafe { nvrtc_result::get_program_log(program.0) }
        .map(|raw| c_chars_to_string(&raw))
        .unwrap_or_default();
    if let Err(e) = compiled {
        return Err(fail(format!("{e}"), log));
    }
    let mut size = 0usize;
    // SAFETY: the program compiled; `size` is valid for writes.
    unsafe { nvrtc_sys::nvrtcGetCUBINSize(program.0, &mut size) }
        .result()
        .map_err(|e| fail(format!("nvrtcGetCUBINSize: {e}"), log.clone()))?;
    let mut cubin = vec![0u8; size];
    // SAFETY: `cubin` holds exactly the `size` bytes NVRTC reported for this program.
    unsafe { nvrtc_sys::nvrtcGetCUBIN(program.0, cubin.as_mut_ptr().cast::<c_char>()) }
        .result()
        .map_err(|e| fail(format!("nvrtcGetCUBIN: {e}"), log.clone()))?;
    if cubin.is_empty() {
        return Err(fail("NVRTC returned an empty cubin".into(), log));
    }
    Ok((log, cubin))
}

/// An NVRTC program, destroyed on drop.
struct Program(nvrtc_sys::nvrtcProgram);

impl Drop for Program {
    fn drop(&mut self) {
        // SAFETY: the program was created by nvrtcCreateProgram and is destroyed once. A failure to destroy
        // only leaks the program; it is recorded.
        if let Err(e) = unsafe { nvrtc_result::destroy_program(self.0) } {
            crate::cuda::error::record_drop_error("destroying an NVRTC program", format!("{e:?}"));
        }
    }
}

fn c_chars_to_string(raw: &[c_char]) -> String {
    let bytes: Vec<u8> = raw.iter().take_while(|&&c| c != 0).map(|&c| c as u8).collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

/// Reads a cache entry; `None` when it is missing, truncated, oversized or fails its checksum.
fn read_entry(path: &Path) -> Option<(String, Vec<u8>)> {
    let bytes = std::fs::read(path).ok()?;
    if bytes.len() < CACHE_MAGIC.len() + 16 + 32 || (bytes.len() as u64) > CACHE_ENTRY_BYTES_MAX {
        return None;
    }
    let (body, digest) = bytes.split_at(bytes.len() - 32);
    if Sha256::digest(body).as_slice() != digest {
        return None;
    }
    let rest = body.strip_prefix(CACHE_MAGIC.as_slice())?;
    let (log, rest) = take_field(rest)?;
    let (cubin, rest) = take_field(rest)?;
    if !rest.is_empty() || cubin.is_empty() {
        return None;
    }
    Some((String::from_utf8(log.to_vec()).ok()?, cubin.to_vec()))
}

fn take_field(bytes: &[u8]) -> Option<(&[u8], &[u8])> {
    let (len, rest) = bytes.split_at_checked(8)?;
    let len = usize::try_from(u64::from_le_bytes(len.try_into().ok()?)).ok()?;
    rest.split_at_checked(len)
}

/// Writes a cache entry atomically: a unique temporary file in the same directory, then a rename.
fn write_entry(path: &Path, log: &str, cubin: &[u8]) -> Result<()> {
    let io = |p: &Path, source: std::io::Error| CudaError::Cache {
        path: p.display().to_string(),
        source,
    };
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(|e| io(dir, e))?;
    let mut body = Vec::with_capacity(CACHE_MAGIC.len() + 16 + log.len() + cubin.len() + 32);
    body.extend_from_slice(CACHE_MAGIC);
    body.extend_from_slice(&(log.len() as u64).to_le_bytes());
    body.extend_from_slice(log.as_bytes());
    body.extend_from_slice(&(cubin.len() as u64).to_le_bytes());
    body.extend_from_slice(cubin);
    let digest = Sha256::digest(&body);
    body.extend_from_slice(&digest);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let tmp = dir.join(format!(
        ".{}.tmp.{}.{nanos}",
        path.file_name().map(|n| n.to_string_lossy()).unwrap_or_default(),
        std::process::id()
    ));
    let written = std::fs::File::create(&tmp).and_then(|mut f| {
        f.write_all(&body)?;
        f.sync_all()
    });
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(io(&tmp, e));
    }
    std::fs::rename(&tmp, path).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        io(path, e)
    })
}

/// Parses ptxas' verbose report (as NVRTC puts it in the program log) into one entry per compiled entry point,
/// in the order ptxas reports them. Lines of non-entry functions are ignored.
pub fn parse_ptxas_log(log: &str) -> Vec<KernelResources> {
    let mut out: Vec<KernelResources> = Vec::new();
    // Index in `out` of the function the next "stack frame" / "Used" lines describe.
    let mut current: Option<usize> = None;
    for line in log.lines() {
        if let Some(name) = quoted_after(line, "Compiling entry function '") {
            out.push(KernelResources {
                kernel: name.to_string(),
                ..Default::default()
            });
            current = Some(out.len() - 1);
        } else if let Some(name) = quoted_after(line, "Function properties for ") {
            current = out.iter().position(|k| k.kernel == name);
        } else if let Some(i) = current {
            let k = &mut out[i];
            if line.contains("bytes stack frame") {
                k.stack_bytes = number_before(line, "bytes stack frame").unwrap_or(0);
                k.spill_stores = number_before(line, "bytes spill stores").unwrap_or(0);
                k.spill_loads = number_before(line, "bytes spill loads").unwrap_or(0);
            } else if line.contains("Used ") && line.contains("registers") {
                k.registers = number_before(line, "registers").unwrap_or(0);
                k.smem_bytes = number_before(line, "bytes smem").unwrap_or(0);
            }
        }
    }
    out
}

/// The text after `prefix` up to the next `'` (or the end of the line, without surrounding quotes).
fn quoted_after<'a>(line: &'a str, prefix: &str) -> Option<&'a str> {
    let start = line.find(prefix)? + prefix.len();
    let rest = &line[start..];
    let rest = rest.strip_prefix('\'').unwrap_or(rest);
    Some(rest.split('\'').next().unwrap_or(rest).trim())
}

/// The integer immediately before `suffix` in `line` (`"Used 12 registers"`, `"registers"` → 12).
fn number_before(line: &str, suffix: &str) -> Option<u32> {
    let end = line.find(suffix)?;
    line[..end].split_whitespace().last()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    const LOG: &str = "\
ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function 'gelu_forward_f32' for 'sm_90'
ptxas info    : Function properties for gelu_forward_f32
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 12 registers, used 1 barriers, 1024 bytes smem, 400 bytes cmem[0]
ptxas info    : Compiling entry function 'big' for 'sm_90'
ptxas info    : Function properties for helper
    8 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Function properties for big
    16 bytes stack frame, 16 bytes spill stores, 8 bytes spill loads
ptxas info    : Used 255 registers, 368 bytes cmem[0]
";

    #[test]
    fn parses_the_ptxas_report() {
        let k = parse_ptxas_log(LOG);
        assert_eq!(k.len(), 2);
        assert_eq!(
            k[0],
            KernelResources {
                kernel: "gelu_forward_f32".into(),
                registers: 12,
                smem_bytes: 1024,
                stack_bytes: 0,
                spill_stores: 0,
                spill_loads: 0
            }
        );
        assert!(!k[0].spills());
        assert_eq!((k[1].registers, k[1].smem_bytes, k[1].stack_bytes), (255, 0, 16));
        assert_eq!((k[1].spill_stores, k[1].spill_loads), (16, 8));
        assert!(k[1].spills());
    }

    #[test]
    fn cache_entries_round_trip_and_corruption_is_detected() {
        let dir = std::env::temp_dir().join(format!("baton-kc-test-{}", std::process::id()));
        let path = dir.join("x.cubin");
        write_entry(&path, "log text", &[1, 2, 3, 4]).unwrap();
        assert_eq!(read_entry(&path), Some(("log text".to_string(), vec![1, 2, 3, 4])));
        let mut bytes = std::fs::read(&path).unwrap();
        let mid = bytes.len() / 2;
        bytes[mid] ^= 0x40;
        std::fs::write(&path, &bytes).unwrap();
        assert_eq!(read_entry(&path), None, "a flipped byte must fail the checksum");
        std::fs::write(&path, &bytes[..10]).unwrap();
        assert_eq!(read_entry(&path), None, "a truncated entry must be rejected");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn arch_names() {
        assert_eq!(Arch::SM90.to_string(), "sm_90");
        assert_eq!(Arch::SM80.to_string(), "sm_80");
        let o = nvrtc_options(Arch::SM90, &BuildOptions::default());
        assert_eq!(o, ["--gpu-architecture=sm_90", "--std=c++17", "--ptxas-options=-v"]);
    }
}

//! Makes the binaries and test executables find and really link libtorch with no environment
//! variables: an rpath to libtorch's lib folder, and libtorch.so (which pulls in libtorch_cuda)
//! linked without --as-needed, which would otherwise drop it because no symbol of ours names it,
//! and CUDA would then never register on a GPU machine.
fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    let lib_dir = std::env::var("DEP_TCH_LIBTORCH_LIB").ok();
    // Record the libtorch release for `--version`: PyPI installs carry torch/version.py,
    // official zips and scripts/setup.sh a build-version file beside lib/.
    let version = lib_dir
        .as_deref()
        .and_then(|d| std::path::Path::new(d).parent().map(|p| p.to_path_buf()))
        .and_then(|root| {
            std::fs::read_to_string(root.join("build-version"))
                .ok()
                .or_else(|| {
                    let text = std::fs::read_to_string(root.join("version.py")).ok()?;
                    let line = text.lines().find(|l| l.starts_with("__version__"))?;
                    Some(line.split('\'').nth(1)?.to_string())
                })
        })
        .map(|v| v.trim().to_string())
        .unwrap_or_else(|| "unknown".into());
    println!("cargo:rustc-env=METAPOISON_LIBTORCH_VERSION={version}");
    // The crate's own CPU kernels (src/model/*.cpp) are compiled and linked, and libtorch is
    // linked, the way Linux's toolchain does it; elsewhere the Rust side would declare
    // functions nothing defines, and the link would fail with pages of undefined symbols.
    let target_os = std::env::var("CARGO_CFG_TARGET_OS").unwrap_or_default();
    if target_os != "linux" {
        panic!(
            "metapoison builds on Linux only (target_os = {target_os}): its C++ kernels and \
             libtorch linking are Linux-specific; build on Linux x86_64 (a container works)"
        );
    }
    if let Some(lib_dir) = lib_dir.as_deref() {
        compile_cpp(lib_dir);
    }
    if let Some(lib_dir) = lib_dir {
        println!("cargo:rustc-link-arg=-Wl,-rpath,{lib_dir}");
        println!("cargo:rustc-link-arg=-Wl,--no-as-needed");
        println!("cargo:rustc-link-arg=-ltorch");
        if std::path::Path::new(&lib_dir)
            .join("libtorch_cuda.so")
            .exists()
        {
            println!("cargo:rustc-link-arg=-ltorch_cuda");
        }
        println!("cargo:rustc-link-arg=-Wl,--as-needed");
    }
}

/// The crate's C++ (the ops in src/model/*.cpp, the profiler hook in src/bench/profile.cpp),
/// compiled against libtorch's headers with the flags torch-sys uses for its own C++.
fn compile_cpp(lib_dir: &str) {
    println!("cargo:rerun-if-changed=src/model/fused_bn.cpp");
    println!("cargo:rerun-if-changed=src/model/conv2d.cpp");
    println!("cargo:rerun-if-changed=src/model/max_pool.cpp");
    println!("cargo:rerun-if-changed=src/model/ffi.h");
    println!("cargo:rerun-if-changed=src/bench/profile.cpp");
    // The profiler hook belongs to the speed harness, built with the `timing` feature only.
    let timing = std::env::var_os("CARGO_FEATURE_TIMING").is_some();
    let root = std::path::Path::new(lib_dir)
        .parent()
        .expect("libtorch's lib folder has a parent");
    let abi = std::env::var("LIBTORCH_CXX11_ABI").unwrap_or_else(|_| "1".to_owned());
    let mut build = cc::Build::new();
    if timing {
        build.file("src/bench/profile.cpp");
    }
    build
        .cpp(true)
        .file("src/model/fused_bn.cpp")
        .file("src/model/conv2d.cpp")
        .file("src/model/max_pool.cpp")
        .flag("-std=c++17")
        .flag(format!("-D_GLIBCXX_USE_CXX11_ABI={abi}"))
        .flag("-DGLOG_USE_GLOG_EXPORT")
        // OpenMP as libtorch is built: at::parallel_for is a header template, and without
        // _OPENMP it runs its whole range on the calling thread.
        .flag("-fopenmp")
        // Lets the per-channel sums vectorise with their partial sums in registers (the
        // reduction order does not matter to these kernels; `omp simd reduction` kept them
        // on the stack, a store and a load per vector).
        .flag("-fno-math-errno")
        .flag("-fno-signed-zeros")
        .flag("-fno-trapping-math")
        .flag("-fassociative-math")
        .opt_level(3)
        // libtorch's own headers are system headers here, so the warnings are ours.
        .flag(format!("-isystem{}", root.join("include").display()))
        .flag(format!(
            "-isystem{}",
            root.join("include/torch/csrc/api/include").display()
        ))
        .warnings(true)
        .extra_warnings(true)
        // GCC notes that 64-byte vector returns change the ABI without AVX-512; the functions
        // returning them are internal to one file, so no ABI boundary is crossed.
        .flag("-Wno-psabi")
        .compile("metapoison_fused_batch_norm");
    // The static library calls into libtorch: name its libraries after it on the link line.
    println!("cargo:rustc-link-search=native={lib_dir}");
    println!("cargo:rustc-link-lib=dylib=torch_cpu");
    println!("cargo:rustc-link-lib=dylib=c10");
    // The OpenMP runtime libtorch itself loads (its own copy beside it, found through the
    // rpath), so that both sides share one thread pool.
    if std::path::Path::new(lib_dir).join("libgomp.so.1").exists() {
        println!("cargo:rustc-link-arg=-l:libgomp.so.1");
    } else {
        println!("cargo:rustc-link-lib=dylib=gomp");
    }
}

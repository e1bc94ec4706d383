//! With the `python` feature, the test and example binaries of this crate link
//! libpython dynamically; record its directory as an rpath so they find it at run
//! time without LD_LIBRARY_PATH (pyenv and similar installs are not on the loader's
//! default path). Binaries of other crates that enable the feature need the same
//! (see pyo3_build_config::get().lib_dir).

fn main() {
    #[cfg(feature = "python")]
    {
        let config = pyo3_build_config::get();
        if let Some(dir) = config.lib_dir() {
            println!("cargo:rustc-link-arg=-Wl,-rpath,{dir}");
        }
    }
}

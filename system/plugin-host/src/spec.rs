//! The `[[plugins]]` section of a worker config: which plugins a worker runs, and how.
//!
//! ```toml
//! [[plugins]]
//! name = "echo"
//! mode = "cdylib"
//! path = "target/debug/librollout_example_echo.so"
//!
//! [[plugins]]
//! name = "score"
//! mode = "python"              # in-process (needs the `python` feature)
//! module = "score"             # imported as `import score`; it defines handle(...)
//! path = "plugins/python"      # optional: prepended to sys.path
//!
//! [[plugins]]
//! name = "echo-py"
//! mode = "sidecar"             # a separate Python process, gRPC over a Unix socket
//! script = "python/examples/echo_plugin.py"   # or module = "pkg.mod", or command = [..]
//! python = ".venv/bin/python"  # optional, default "python3"; ignored with `command`
//! path = "python/examples"     # optional: prepended to PYTHONPATH
//! socket = "/run/rollout/echo-py.sock"   # optional, default in the temp dir
//! startup_timeout = "10s"      # optional, default 10s
//! ```
//!
//! Unknown keys are errors, and every error names the field (`plugins[1].path`).
//! [`plugin_specs_from_config_file`] (what `rollout worker --config FILE` uses) takes
//! relative paths relative to the config file's directory: `path`, `script`, `socket`,
//! and `python` or `command[0]` when they have a directory part (a bare program name
//! such as `python3` is looked up on `PATH`); `command`'s arguments are passed as
//! written. [`plugin_specs_from_toml_str`] takes every path as given.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use rollout_core::config::duration_text;
use rollout_core::{Error, Result};
use serde::{Deserialize, Serialize};

/// Longest plugin name; names travel in Register and in every Assign.
pub const PLUGIN_NAME_BYTES_MAX: usize = 64;
/// Most plugins one worker may load.
pub const PLUGINS_MAX: usize = 64;
/// Longest Unix socket path (`sun_path` is 108 bytes including the NUL on Linux).
pub const SOCKET_PATH_BYTES_MAX: usize = 107;
/// How long a sidecar may take to answer its first health check, unless configured.
pub const SIDECAR_STARTUP_TIMEOUT_DEFAULT: Duration = Duration::from_secs(10);
/// Longest `startup_timeout` accepted.
pub const SIDECAR_STARTUP_TIMEOUT_MAX: Duration = Duration::from_secs(600);

/// One validated plugin entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PluginSpec {
    /// The name the coordinator assigns tasks to (unique within a worker).
    pub name: String,
    /// How the plugin runs.
    pub mode: PluginMode,
}

/// How a plugin runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PluginMode {
    /// A Rust cdylib built with `rollout-plugin-sdk`, loaded into the worker.
    Cdylib {
        /// The shared library file.
        path: PathBuf,
    },
    /// A Python module run inside the worker through PyO3.
    Python {
        /// The module to import (dotted name); it defines `handle`.
        module: String,
        /// A directory prepended to `sys.path`, if any.
        path: Option<PathBuf>,
    },
    /// A Python process serving plugin.proto on a Unix socket.
    Sidecar(SidecarSpec),
}

/// How to start and reach a sidecar.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SidecarSpec {
    /// The program to run (the interpreter, or `command[0]`).
    pub program: PathBuf,
    /// Its arguments; the host appends `--socket <path>`.
    pub args: Vec<String>,
    /// A directory prepended to `PYTHONPATH`, if any.
    pub python_path: Option<PathBuf>,
    /// The socket, or `None` for one in the temp dir named after the worker's pid and
    /// the plugin.
    pub socket: Option<PathBuf>,
    /// How long the sidecar may take to start answering health checks.
    pub startup_timeout: Duration,
    /// Variables set in its environment (beside [`SIDECAR_BASE_ENV`] and the SDK's own).
    pub env: BTreeMap<String, String>,
    /// Secrets it gets, each as a variable of its name, read from the worker's
    /// `ROLLOUT_SECRET_<NAME>` through an `EnvSecretStore` allowing only these.
    pub secrets: Vec<String>,
}

/// The variables a sidecar inherits from the worker when they are set; everything else
/// of the worker's environment is withheld (a sidecar starts from a cleared one).
pub const SIDECAR_BASE_ENV: &[&str] =
    &["PATH", "HOME", "USER", "LANG", "LC_ALL", "LC_CTYPE", "TZ", "TMPDIR", "PYTHONPATH", "VIRTUAL_ENV"];
/// At most this many `env` entries per plugin.
pub const SIDECAR_ENV_MAX: usize = 64;
/// The longest `env` value.
pub const SIDECAR_ENV_VALUE_BYTES_MAX: usize = 4096;

/// The shape of one `[[plugins]]` table as written in TOML, before validation.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PluginSpecToml {
    /// See [`PluginSpec::name`].
    pub name: String,
    /// `"cdylib"`, `"python"` or `"sidecar"`.
    pub mode: String,
    /// cdylib: the library; python: a `sys.path` entry; sidecar: a `PYTHONPATH` entry.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<PathBuf>,
    /// python, sidecar: the module to import / run with `-m`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub module: Option<String>,
    /// sidecar: a script to run with the interpreter.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub script: Option<PathBuf>,
    /// sidecar: the whole command line (program and arguments).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<Vec<String>>,
    /// sidecar: the interpreter for `script` or `module` (default `python3`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub python: Option<PathBuf>,
    /// sidecar: the Unix socket path.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub socket: Option<PathBuf>,
    /// sidecar: e.g. `"10s"`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub startup_timeout: Option<String>,
    /// sidecar: variables for its environment, e.g. `env = { MODEL = "small" }`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub env: Option<BTreeMap<String, String>>,
    /// sidecar: secrets it gets as variables of their names, e.g. `secrets = ["OPENAI_KEY"]`
    /// (read from the worker's `ROLLOUT_SECRET_OPENAI_KEY`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secrets: Option<Vec<String>>,
}

#[derive(Deserialize)]
struct PluginsSection {
    #[serde(default)]
    plugins: Vec<PluginSpecToml>,
}

/// Reads the `[[plugins]]` tables of a config document (other sections are ignored:
/// they belong to the core config) and validates them with [`validate_plugin_specs`].
/// Paths are taken as given.
pub fn plugin_specs_from_toml_str(text: &str) -> Result<Vec<PluginSpec>> {
    validate_plugin_specs(&plugin_tables_from_toml_str(text)?)
}

/// Reads and validates the `[[plugins]]` tables of the config file at `path`, with
/// relative paths resolved against the file's directory (see the module docs), so the
/// same file works from any working directory. Errors name the field and the file.
pub fn plugin_specs_from_config_file(path: &Path) -> Result<Vec<PluginSpec>> {
    let in_file = |e: Error| match e {
        Error::Fatal(rollout_core::Fatal::ConfigInvalid { field, reason }) => {
            Error::config_invalid(format!("{field} (in {})", path.display()), reason)
        }
        other => other,
    };
    let text = rollout_core::text::read_text_bounded(path, rollout_core::text::CONFIG_FILE_BYTES_MAX)
        .map_err(|e| Error::config_invalid(path.display().to_string(), format!("cannot read config file: {e}")))?;
    let base = path.parent().filter(|dir| !dir.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let tables = plugin_tables_from_toml_str(&text).map_err(in_file)?;
    let resolved: Vec<PluginSpecToml> = tables.iter().map(|t| t.resolved_against(base)).collect();
    validate_plugin_specs(&resolved).map_err(in_file)
}

fn plugin_tables_from_toml_str(text: &str) -> Result<Vec<PluginSpecToml>> {
    let value: toml::Value = toml::from_str(text)
        .map_err(|e| Error::config_invalid("plugins", format!("not valid TOML: {}", e.message().trim())))?;
    let section: PluginsSection = serde_path_to_error::deserialize(value)
        .map_err(|e| Error::config_invalid(e.path().to_string(), e.into_inner().message().trim().to_owned()))?;
    Ok(section.plugins)
}

/// Validates every entry (errors name `plugins[i].<field>`), then the set: at most
/// [`PLUGINS_MAX`] entries, unique names, unique sockets.
pub fn validate_plugin_specs(raw: &[PluginSpecToml]) -> Result<Vec<PluginSpec>> {
    if raw.len() > PLUGINS_MAX {
        return Err(Error::config_invalid(
            "plugins",
            format!("{} plugins configured, at most {PLUGINS_MAX} are allowed", raw.len()),
        ));
    }
    let mut names = BTreeSet::new();
    let mut sockets = BTreeSet::new();
    let mut specs = Vec::with_capacity(raw.len());
    for (i, entry) in raw.iter().enumerate() {
        let spec = entry.validate(&format!("plugins[{i}]"))?;
        if !names.insert(spec.name.clone()) {
            return Err(Error::config_invalid(
                format!("plugins[{i}].name"),
                format!("{:?} is used by an earlier plugin; names must be unique", spec.name),
            ));
        }
        if let PluginMode::Sidecar(SidecarSpec { socket: Some(socket), .. }) = &spec.mode
            && !sockets.insert(socket.clone())
        {
            return Err(Error::config_invalid(
                format!("plugins[{i}].socket"),
                format!("{} is used by an earlier plugin; sockets must be unique", socket.display()),
            ));
        }
        specs.push(spec);
    }
    Ok(specs)
}

impl PluginSpecToml {
    /// This entry with its relative paths joined onto `base` (see the module docs);
    /// absolute paths, bare program names and empty paths (left for validation to
    /// refuse) are unchanged.
    pub fn resolved_against(&self, base: &Path) -> PluginSpecToml {
        let file = |p: &PathBuf| if p.is_relative() && !p.as_os_str().is_empty() { base.join(p) } else { p.clone() };
        // Like a shell: a program with a directory part is a path, a bare name is
        // looked up on PATH.
        let program = |p: &PathBuf| if p.components().count() > 1 { file(p) } else { p.clone() };
        let mut out = self.clone();
        out.path = self.path.as_ref().map(file);
        out.script = self.script.as_ref().map(file);
        out.socket = self.socket.as_ref().map(file);
        out.python = self.python.as_ref().map(program);
        if let Some(command) = &mut out.command
            && let Some(first) = command.first_mut()
        {
            *first = program(&PathBuf::from(&*first)).display().to_string();
        }
        out
    }

    /// Checks this entry; `at` is its place in the config (e.g. `plugins[0]`), used as
    /// the prefix of the field an error names.
    pub fn validate(&self, at: &str) -> Result<PluginSpec> {
        let field = |name: &str| format!("{at}.{name}");
        check_name(&self.name).map_err(|reason| Error::config_invalid(field("name"), reason))?;
        let allowed: &[&str] = match self.mode.as_str() {
            "cdylib" => &["path"],
            "python" => &["module", "path"],
            "sidecar" => {
                &["path", "module", "script", "command", "python", "socket", "startup_timeout", "env", "secrets"]
            }
            other => {
                return Err(Error::config_invalid(
                    field("mode"),
                    format!("{other:?} is not a plugin mode; use \"cdylib\", \"python\" or \"sidecar\""),
                ));
            }
        };
        for (key, present) in self.present_fields() {
            if present && !allowed.contains(&key) {
                return Err(Error::config_invalid(
                    field(key),
                    format!("not used with mode = {:?} (it takes: {})", self.mode, allowed.join(", ")),
                ));
            }
        }
        let mode = match self.mode.as_str() {
            "cdylib" => {
                let path = self.path.clone().ok_or_else(|| {
                    Error::config_invalid(field("path"), "required with mode = \"cdylib\": the plugin's .so file")
                })?;
                check_path(&path).map_err(|reason| Error::config_invalid(field("path"), reason))?;
                PluginMode::Cdylib { path }
            }
            "python" => {
                let module = self.module.clone().ok_or_else(|| {
                    Error::config_invalid(field("module"), "required with mode = \"python\": the module to import")
                })?;
                check_module(&module).map_err(|reason| Error::config_invalid(field("module"), reason))?;
                if let Some(path) = &self.path {
                    check_path(path).map_err(|reason| Error::config_invalid(field("path"), reason))?;
                }
                PluginMode::Python { module, path: self.path.clone() }
            }
            _ => PluginMode::Sidecar(self.sidecar(&field)?),
        };
        Ok(PluginSpec { name: self.name.clone(), mode })
    }

    fn sidecar(&self, field: &dyn Fn(&str) -> String) -> Result<SidecarSpec> {
        let python = self.python.clone().unwrap_or_else(|| PathBuf::from("python3"));
        let (program, args) = match (&self.command, &self.script, &self.module) {
            (Some(command), None, None) => {
                let Some((program, args)) = command.split_first() else {
                    return Err(Error::config_invalid(
                        field("command"),
                        "is empty: give the program and its arguments",
                    ));
                };
                if program.is_empty() {
                    return Err(Error::config_invalid(field("command"), "the program (first element) is empty"));
                }
                if self.python.is_some() {
                    return Err(Error::config_invalid(
                        field("python"),
                        "not used with `command` (the command names its own program)",
                    ));
                }
                (PathBuf::from(program), args.to_vec())
            }
            (None, Some(script), None) => {
                check_path(script).map_err(|reason| Error::config_invalid(field("script"), reason))?;
                (python, vec![script.display().to_string()])
            }
            (None, None, Some(module)) => {
                check_module(module).map_err(|reason| Error::config_invalid(field("module"), reason))?;
                (python, vec!["-m".to_owned(), module.clone()])
            }
            (None, None, None) => {
                return Err(Error::config_invalid(
                    field("script"),
                    "mode = \"sidecar\" needs one of `script`, `module` or `command`",
                ));
            }
            _ => {
                return Err(Error::config_invalid(
                    field("command"),
                    "give only one of `script`, `module` or `command`",
                ));
            }
        };
        if let Some(path) = &self.path {
            check_path(path).map_err(|reason| Error::config_invalid(field("path"), reason))?;
        }
        if let Some(socket) = &self.socket {
            check_socket(socket).map_err(|reason| Error::config_invalid(field("socket"), reason))?;
        }
        let startup_timeout = match &self.startup_timeout {
            None => SIDECAR_STARTUP_TIMEOUT_DEFAULT,
            Some(text) => {
                let timeout = duration_text::parse(text)
                    .map_err(|reason| Error::config_invalid(field("startup_timeout"), reason))?;
                if timeout.is_zero() || timeout > SIDECAR_STARTUP_TIMEOUT_MAX {
                    return Err(Error::config_invalid(
                        field("startup_timeout"),
                        format!(
                            "{text:?} is out of range: use more than 0s and at most {SIDECAR_STARTUP_TIMEOUT_MAX:?}"
                        ),
                    ));
                }
                timeout
            }
        };
        let env = self.env.clone().unwrap_or_default();
        if env.len() > SIDECAR_ENV_MAX {
            return Err(Error::config_invalid(
                field("env"),
                format!("{} variables, at most {SIDECAR_ENV_MAX} are allowed", env.len()),
            ));
        }
        for (key, value) in &env {
            let valid = key.bytes().next().is_some_and(|b| b.is_ascii_alphabetic() || b == b'_')
                && key.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
            if !valid {
                return Err(Error::config_invalid(
                    field("env"),
                    format!("{key:?} is not a variable name (letters, digits and '_', not starting with a digit)"),
                ));
            }
            if key.starts_with("ROLLOUT_") {
                return Err(Error::config_invalid(
                    field("env"),
                    format!("{key:?}: ROLLOUT_* variables are the worker's and the SDK's; use another name"),
                ));
            }
            if value.len() > SIDECAR_ENV_VALUE_BYTES_MAX || value.contains('\0') {
                return Err(Error::config_invalid(
                    field("env"),
                    format!("the value of {key} is over {SIDECAR_ENV_VALUE_BYTES_MAX} bytes or holds a NUL"),
                ));
            }
        }
        let secrets = self.secrets.clone().unwrap_or_default();
        for name in &secrets {
            let valid = name.bytes().next().is_some_and(|b| b.is_ascii_uppercase())
                && name.bytes().all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_');
            if !valid {
                return Err(Error::config_invalid(
                    field("secrets"),
                    format!("{name:?} is not a secret name ([A-Z][A-Z0-9_]*, read from ROLLOUT_SECRET_<NAME>)"),
                ));
            }
            if env.contains_key(name) {
                return Err(Error::config_invalid(field("secrets"), format!("{name} is also set in env")));
            }
        }
        Ok(SidecarSpec {
            program,
            args,
            python_path: self.path.clone(),
            socket: self.socket.clone(),
            startup_timeout,
            env,
            secrets,
        })
    }

    fn present_fields(&self) -> [(&'static str, bool); 9] {
        [
            ("path", self.path.is_some()),
            ("module", self.module.is_some()),
            ("script", self.script.is_some()),
            ("command", self.command.is_some()),
            ("python", self.python.is_some()),
            ("socket", self.socket.is_some()),
            ("startup_timeout", self.startup_timeout.is_some()),
            ("env", self.env.is_some()),
            ("secrets", self.secrets.is_some()),
        ]
    }
}

fn check_name(name: &str) -> std::result::Result<(), String> {
    if name.is_empty() {
        return Err("is empty: give the plugin a name (letters, digits, '-', '_', '.')".to_owned());
    }
    if name.len() > PLUGIN_NAME_BYTES_MAX {
        return Err(format!("{name:?} is longer than {PLUGIN_NAME_BYTES_MAX} bytes"));
    }
    if let Some(c) = name.chars().find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))) {
        return Err(format!("{name:?} contains {c:?}; use letters, digits, '-', '_' and '.'"));
    }
    Ok(())
}

fn check_module(module: &str) -> std::result::Result<(), String> {
    let valid_part = |part: &str| {
        part.chars().next().is_some_and(|c| c.is_alphabetic() || c == '_')
            && part.chars().all(|c| c.is_alphanumeric() || c == '_')
    };
    if module.split('.').all(valid_part) {
        Ok(())
    } else {
        Err(format!("{module:?} is not a Python module name (dotted identifiers, e.g. \"pkg.plugin\")"))
    }
}

fn check_path(path: &Path) -> std::result::Result<(), String> {
    if path.as_os_str().is_empty() { Err("is empty".to_owned()) } else { Ok(()) }
}

/// Checks a socket path fits in `sun_path`.
pub(crate) fn check_socket(path: &Path) -> std::result::Result<(), String> {
    check_path(path)?;
    let len = path.as_os_str().len();
    if len > SOCKET_PATH_BYTES_MAX {
        return Err(format!(
            "{} is {len} bytes; Unix socket paths are limited to {SOCKET_PATH_BYTES_MAX}: use a shorter one",
            path.display()
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Vec<PluginSpec>> {
        plugin_specs_from_toml_str(text)
    }

    fn field_of(err: Error) -> String {
        match err {
            Error::Fatal(rollout_core::Fatal::ConfigInvalid { field, .. }) => field,
            other => panic!("expected ConfigInvalid, got {other:?}"),
        }
    }

    #[test]
    fn all_three_modes_parse() -> Result<()> {
        let specs = parse(
            r#"
            [health]
            heartbeat_interval = "500ms"

            [[plugins]]
            name = "echo"
            mode = "cdylib"
            path = "lib/libecho.so"

            [[plugins]]
            name = "score"
            mode = "python"
            module = "pkg.score"
            path = "plugins"

            [[plugins]]
            name = "echo-py"
            mode = "sidecar"
            script = "python/examples/echo_plugin.py"
            python = ".venv/bin/python"
            startup_timeout = "3s"
            "#,
        )?;
        assert_eq!(specs.len(), 3);
        assert_eq!(specs[0].mode, PluginMode::Cdylib { path: "lib/libecho.so".into() });
        assert_eq!(specs[1].mode, PluginMode::Python { module: "pkg.score".into(), path: Some("plugins".into()) });
        let PluginMode::Sidecar(sidecar) = &specs[2].mode else { panic!("expected a sidecar") };
        assert_eq!(sidecar.program, PathBuf::from(".venv/bin/python"));
        assert_eq!(sidecar.args, vec!["python/examples/echo_plugin.py".to_owned()]);
        assert_eq!(sidecar.startup_timeout, Duration::from_secs(3));
        Ok(())
    }

    #[test]
    fn sidecar_module_and_command_forms() -> Result<()> {
        let specs = parse(
            r#"
            [[plugins]]
            name = "a"
            mode = "sidecar"
            module = "echo_plugin"
            [[plugins]]
            name = "b"
            mode = "sidecar"
            command = ["/opt/py/bin/python", "-u", "serve.py"]
            socket = "/tmp/b.sock"
            "#,
        )?;
        let PluginMode::Sidecar(a) = &specs[0].mode else { panic!("expected a sidecar") };
        assert_eq!(
            (a.program.as_path(), a.args.as_slice()),
            (Path::new("python3"), &["-m".into(), "echo_plugin".into()][..])
        );
        assert_eq!(a.startup_timeout, SIDECAR_STARTUP_TIMEOUT_DEFAULT);
        let PluginMode::Sidecar(b) = &specs[1].mode else { panic!("expected a sidecar") };
        assert_eq!(b.program, PathBuf::from("/opt/py/bin/python"));
        assert_eq!(b.socket.as_deref(), Some(Path::new("/tmp/b.sock")));
        Ok(())
    }

    #[test]
    fn a_sidecar_declares_its_environment_and_secrets() -> Result<()> {
        let base = "[[plugins]]\nname = \"a\"\nmode = \"sidecar\"\nmodule = \"m\"\n";
        let specs = parse(&format!("{base}env = {{ MODEL = \"small\" }}\nsecrets = [\"OPENAI_KEY\"]\n"))?;
        let PluginMode::Sidecar(a) = &specs[0].mode else { panic!("expected a sidecar") };
        assert_eq!(a.env.get("MODEL").map(String::as_str), Some("small"));
        assert_eq!(a.secrets, vec!["OPENAI_KEY".to_owned()]);
        for (extra, words) in [
            ("env = { ROLLOUT_JOIN_TOKEN = \"x\" }", "ROLLOUT_"),
            ("env = { \"1X\" = \"x\" }", "not a variable name"),
            ("secrets = [\"lower\"]", "not a secret name"),
            ("secrets = [\"MODEL\"]\nenv = { MODEL = \"x\" }", "also set in env"),
        ] {
            let err = parse(&format!("{base}{extra}\n")).expect_err(extra);
            let text = err.to_string();
            assert!(text.contains(words), "{extra}: {text}");
            assert!(field_of(err).starts_with("plugins[0]."), "{extra}");
        }
        let err = parse("[[plugins]]\nname = \"c\"\nmode = \"cdylib\"\npath = \"x.so\"\nsecrets = [\"K\"]\n")
            .expect_err("cdylib secrets");
        assert_eq!(field_of(err), "plugins[0].secrets");
        Ok(())
    }

    #[test]
    fn no_plugins_section_is_no_plugins() -> Result<()> {
        assert!(parse("[health]\nheartbeat_interval = \"1s\"\n")?.is_empty());
        Ok(())
    }

    #[test]
    fn errors_name_the_field() {
        let cases = [
            ("[[plugins]]\nname = \"x\"\nmode = \"cdylib\"\n", "plugins[0].path"),
            ("[[plugins]]\nname = \"x\"\nmode = \"wasm\"\n", "plugins[0].mode"),
            ("[[plugins]]\nname = \"a b\"\nmode = \"cdylib\"\npath = \"p\"\n", "plugins[0].name"),
            ("[[plugins]]\nname = \"x\"\nmode = \"cdylib\"\npath = \"p\"\nmodule = \"m\"\n", "plugins[0].module"),
            ("[[plugins]]\nname = \"x\"\nmode = \"python\"\nmodule = \"not-a-module\"\n", "plugins[0].module"),
            ("[[plugins]]\nname = \"x\"\nmode = \"sidecar\"\n", "plugins[0].script"),
            ("[[plugins]]\nname = \"x\"\nmode = \"sidecar\"\nscript = \"a\"\nmodule = \"b\"\n", "plugins[0].command"),
            ("[[plugins]]\nname = \"x\"\nmode = \"sidecar\"\ncommand = []\n", "plugins[0].command"),
            (
                "[[plugins]]\nname = \"x\"\nmode = \"sidecar\"\nscript = \"a\"\nstartup_timeout = \"10\"\n",
                "plugins[0].startup_timeout",
            ),
            (
                "[[plugins]]\nname = \"x\"\nmode = \"sidecar\"\nscript = \"a\"\nstartup_timeout = \"0s\"\n",
                "plugins[0].startup_timeout",
            ),
            (
                "[[plugins]]\nname = \"x\"\nmode = \"cdylib\"\npath = \"a\"\n[[plugins]]\nname = \"x\"\nmode = \"cdylib\"\npath = \"b\"\n",
                "plugins[1].name",
            ),
            ("[[plugins]]\nname = \"x\"\nmode = \"cdylib\"\npaht = \"a\"\n", "plugins[0].paht"),
        ];
        for (text, want) in cases {
            let err = parse(text).expect_err(text);
            assert_eq!(field_of(err), want, "for {text}");
        }
    }

    #[test]
    fn a_config_file_resolves_relative_paths_against_its_directory() -> Result<()> {
        let dir = tempfile::tempdir().map_err(|e| Error::internal(e.to_string()))?;
        let file = dir.path().join("worker.toml");
        let text = r#"
            [health]
            heartbeat_interval = "200ms"

            [[plugins]]
            name = "echo"
            mode = "cdylib"
            path = "lib/libecho.so"

            [[plugins]]
            name = "echo-py"
            mode = "sidecar"
            script = "py/echo_plugin.py"
            python = "../.venv/bin/python"
            path = "py"
            socket = "/tmp/echo-py.sock"

            [[plugins]]
            name = "bare"
            mode = "sidecar"
            module = "echo_plugin"
            python = "python3"

            [[plugins]]
            name = "cmd"
            mode = "sidecar"
            command = ["bin/serve", "serve.py"]
        "#;
        std::fs::write(&file, text).map_err(|e| Error::internal(e.to_string()))?;
        let specs = plugin_specs_from_config_file(&file)?;
        let base = dir.path();
        assert_eq!(specs[0].mode, PluginMode::Cdylib { path: base.join("lib/libecho.so") });
        let PluginMode::Sidecar(py) = &specs[1].mode else { panic!("expected a sidecar") };
        assert_eq!(py.program, base.join("../.venv/bin/python"));
        assert_eq!(py.args, vec![base.join("py/echo_plugin.py").display().to_string()]);
        assert_eq!(py.python_path.as_deref(), Some(base.join("py").as_path()));
        assert_eq!(py.socket.as_deref(), Some(Path::new("/tmp/echo-py.sock")), "absolute: unchanged");
        let PluginMode::Sidecar(bare) = &specs[2].mode else { panic!("expected a sidecar") };
        assert_eq!(bare.program, PathBuf::from("python3"), "a bare program is looked up on PATH");
        let PluginMode::Sidecar(cmd) = &specs[3].mode else { panic!("expected a sidecar") };
        assert_eq!(cmd.program, base.join("bin/serve"));
        assert_eq!(cmd.args, vec!["serve.py".to_owned()], "command arguments are passed as written");

        // The same text parsed without a file keeps the paths as given.
        let as_given = parse(text)?;
        assert_eq!(as_given[0].mode, PluginMode::Cdylib { path: "lib/libecho.so".into() });

        // Errors name the field and the file.
        std::fs::write(&file, "[[plugins]]\nname = \"x\"\nmode = \"cdylib\"\n")
            .map_err(|e| Error::internal(e.to_string()))?;
        let field = field_of(plugin_specs_from_config_file(&file).expect_err("no path"));
        assert_eq!(field, format!("plugins[0].path (in {})", file.display()));
        Ok(())
    }

    #[test]
    fn long_socket_paths_are_refused() {
        let socket = format!("/tmp/{}.sock", "s".repeat(120));
        let text = format!("[[plugins]]\nname = \"x\"\nmode = \"sidecar\"\nscript = \"a\"\nsocket = \"{socket}\"\n");
        let err = parse(&text).expect_err("a 130-byte socket path");
        assert_eq!(field_of(err), "plugins[0].socket");
    }

    #[test]
    fn duplicate_sockets_are_refused() {
        let text = "[[plugins]]\nname = \"a\"\nmode = \"sidecar\"\nscript = \"a\"\nsocket = \"/tmp/s\"\n\
                    [[plugins]]\nname = \"b\"\nmode = \"sidecar\"\nscript = \"b\"\nsocket = \"/tmp/s\"\n";
        assert_eq!(field_of(parse(text).expect_err("same socket twice")), "plugins[1].socket");
    }
}

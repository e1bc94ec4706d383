//! The built-in plugins, and [`PluginRouter`], which puts several plugin hosts behind
//! one (a worker runs its configured plugins from `rollout-plugin-host` and the built-in
//! ones beside them).
//!
//! Built-ins: `echo` returns its payload, `sleep` sleeps the payload's milliseconds
//! (decimal text) and returns the payload. Both honour the call's deadline and cancel
//! token.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rollout_core::traits::{CancelToken, PluginCall, PluginError, PluginHost};

/// How often a sleeping call looks at its cancel token.
const CANCEL_POLL: Duration = Duration::from_millis(5);

/// `echo` and `sleep`.
#[derive(Debug, Default, Clone, Copy)]
pub struct BuiltinPlugins;

impl PluginHost for BuiltinPlugins {
    fn plugins(&self) -> Vec<String> {
        vec!["echo".to_owned(), "sleep".to_owned()]
    }

    fn call(&self, call: &PluginCall, cancel: &CancelToken) -> Result<Vec<u8>, PluginError> {
        if cancel.is_cancelled() {
            return Err(PluginError::Cancelled);
        }
        match call.plugin.as_str() {
            "echo" => Ok(call.payload.clone()),
            "sleep" => {
                let text = std::str::from_utf8(&call.payload).map_err(|_| failed("sleep: the payload is not UTF-8"))?;
                let ms: u64 = text.trim().parse().map_err(|_| {
                    failed(format!("sleep: the payload must be a number of milliseconds, got {:?}", truncate(text)))
                })?;
                sleep_cancellable(Duration::from_millis(ms), call.deadline, cancel)?;
                Ok(call.payload.clone())
            }
            other => Err(PluginError::NotFound(other.to_owned())),
        }
    }

    /// `echo` copies its payload: nothing to wait for.
    fn runs_in_place(&self, plugin: &str) -> bool {
        plugin == "echo"
    }
}

/// Several plugin hosts behind one. Each plugin name goes to the first host (in the
/// order given) that offers it, so a configured plugin named `echo` replaces the
/// built-in one. The set of names is fixed at construction: it is what the worker
/// advertises at Register.
pub struct PluginRouter {
    routes: BTreeMap<String, Arc<dyn PluginHost>>,
}

impl PluginRouter {
    /// Routes every plugin of `hosts` to the first host that offers it.
    pub fn new(hosts: impl IntoIterator<Item = Arc<dyn PluginHost>>) -> Self {
        let mut routes = BTreeMap::new();
        for host in hosts {
            for name in host.plugins() {
                routes.entry(name).or_insert_with(|| Arc::clone(&host));
            }
        }
        PluginRouter { routes }
    }
}

impl std::fmt::Debug for PluginRouter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PluginRouter").field("plugins", &self.routes.keys().collect::<Vec<_>>()).finish()
    }
}

impl PluginHost for PluginRouter {
    fn plugins(&self) -> Vec<String> {
        self.routes.keys().cloned().collect()
    }

    fn call(&self, call: &PluginCall, cancel: &CancelToken) -> Result<Vec<u8>, PluginError> {
        match self.routes.get(&call.plugin) {
            Some(host) => host.call(call, cancel),
            None => Err(PluginError::NotFound(call.plugin.clone())),
        }
    }

    fn runs_in_place(&self, plugin: &str) -> bool {
        self.routes.get(plugin).is_some_and(|host| host.runs_in_place(plugin))
    }

    /// Each routed plugin's restarts, from the host it is routed to.
    fn restarts(&self) -> Vec<(String, u64)> {
        let mut hosts: Vec<&Arc<dyn PluginHost>> = Vec::new();
        for host in self.routes.values() {
            if !hosts.iter().any(|h| Arc::ptr_eq(h, host)) {
                hosts.push(host);
            }
        }
        let mut out: Vec<(String, u64)> = hosts
            .into_iter()
            .flat_map(|host| {
                host.restarts()
                    .into_iter()
                    .filter(|(name, _)| self.routes.get(name).is_some_and(|h| Arc::ptr_eq(h, host)))
            })
            .collect();
        out.sort();
        out
    }
}

fn sleep_cancellable(duration: Duration, deadline: Duration, cancel: &CancelToken) -> Result<(), PluginError> {
    let start = Instant::now();
    loop {
        if cancel.is_cancelled() {
            return Err(PluginError::Cancelled);
        }
        let elapsed = start.elapsed();
        if elapsed >= duration {
            return Ok(());
        }
        if elapsed >= deadline {
            return Err(PluginError::DeadlineExceeded(deadline));
        }
        let left = duration.min(deadline).saturating_sub(elapsed);
        std::thread::sleep(left.min(CANCEL_POLL));
    }
}

fn failed(message: impl Into<String>) -> PluginError {
    PluginError::Failed { message: message.into(), detail: None }
}

fn truncate(text: &str) -> String {
    rollout_core::text::truncate_at_char_boundary(text.to_owned(), 64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn call(plugin: &str, payload: &[u8], deadline_ms: u64) -> PluginCall {
        PluginCall {
            plugin: plugin.into(),
            method: "run".into(),
            payload: payload.to_vec(),
            deadline: Duration::from_millis(deadline_ms),
            inputs: Vec::new(),
        }
    }

    #[test]
    fn echo_returns_the_payload() {
        assert_eq!(BuiltinPlugins.call(&call("echo", b"hi", 1000), &CancelToken::new()), Ok(b"hi".to_vec()));
    }

    /// A host with fixed names that answers with its own label.
    struct Labelled(&'static str, &'static [&'static str]);

    impl PluginHost for Labelled {
        fn plugins(&self) -> Vec<String> {
            self.1.iter().map(|p| (*p).to_owned()).collect()
        }

        fn call(&self, _call: &PluginCall, _cancel: &CancelToken) -> Result<Vec<u8>, PluginError> {
            Ok(self.0.as_bytes().to_vec())
        }
    }

    #[test]
    fn router_advertises_the_union_and_the_first_host_wins_a_name() {
        let configured: Arc<dyn PluginHost> = Arc::new(Labelled("configured", &["echo", "echo-py"]));
        let router = PluginRouter::new([configured, Arc::new(BuiltinPlugins) as Arc<dyn PluginHost>]);
        assert_eq!(router.plugins(), ["echo", "echo-py", "sleep"]);
        let cancel = CancelToken::new();
        assert_eq!(router.call(&call("echo", b"hi", 1000), &cancel), Ok(b"configured".to_vec()), "configured echo");
        assert_eq!(router.call(&call("echo-py", b"hi", 1000), &cancel), Ok(b"configured".to_vec()));
        assert_eq!(router.call(&call("sleep", b"1", 1000), &cancel), Ok(b"1".to_vec()), "built-in sleep");
        assert_eq!(router.call(&call("nope", b"", 1000), &cancel), Err(PluginError::NotFound("nope".into())));
    }

    #[test]
    fn sleep_honours_deadline_and_cancel() {
        assert_eq!(BuiltinPlugins.call(&call("sleep", b"5", 1000), &CancelToken::new()), Ok(b"5".to_vec()));
        assert_eq!(
            BuiltinPlugins.call(&call("sleep", b"5000", 20), &CancelToken::new()),
            Err(PluginError::DeadlineExceeded(Duration::from_millis(20)))
        );
        let cancel = CancelToken::new();
        cancel.cancel();
        assert_eq!(BuiltinPlugins.call(&call("sleep", b"5000", 10_000), &cancel), Err(PluginError::Cancelled));
        assert!(matches!(
            BuiltinPlugins.call(&call("sleep", b"soon", 10), &CancelToken::new()),
            Err(PluginError::Failed { .. })
        ));
        assert_eq!(
            BuiltinPlugins.call(&call("nope", b"", 10), &CancelToken::new()),
            Err(PluginError::NotFound("nope".into()))
        );
    }
}

//! Example cdylib plugin. Methods:
//! - `echo`: returns the payload;
//! - `upper`: returns the payload with ASCII letters upper-cased;
//! - `fail`: returns an error (the task attempt fails);
//! - `panic`: panics (caught by the SDK, reported as an error);
//! - `sleep`: sleeps for the payload, read as decimal milliseconds, then returns it;
//! - `inputs`: returns the size in bytes of each input blob's file, one per line.

use std::time::Duration;

/// Longest `sleep` honoured, so a typo cannot park a thread for days.
const SLEEP_MS_MAX: u64 = 60_000;

fn handle(method: &str, payload: &[u8], inputs: &[&std::path::Path]) -> Result<Vec<u8>, String> {
    match method {
        "inputs" => {
            let sizes: Result<Vec<String>, String> = inputs
                .iter()
                .map(|p| std::fs::metadata(p).map(|m| m.len().to_string()).map_err(|e| format!("{}: {e}", p.display())))
                .collect();
            Ok(sizes?.join("\n").into_bytes())
        }
        "echo" => Ok(payload.to_vec()),
        "upper" => Ok(payload.to_ascii_uppercase()),
        "fail" => Err(format!("fail was called with {} bytes", payload.len())),
        "panic" => panic!("the panic method was called"),
        "sleep" => {
            let text = std::str::from_utf8(payload).map_err(|_| "sleep: payload is not UTF-8".to_owned())?;
            let ms: u64 =
                text.trim().parse().map_err(|_| format!("sleep: {text:?} is not a number of milliseconds"))?;
            std::thread::sleep(Duration::from_millis(ms.min(SLEEP_MS_MAX)));
            Ok(payload.to_vec())
        }
        other => Err(format!("unknown method {other:?}; this plugin has echo, upper, fail, panic, sleep, inputs")),
    }
}

rollout_plugin_sdk::export_plugin!("echo", handle, inputs);

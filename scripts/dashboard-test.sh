#!/usr/bin/env bash
# The coordinator's dashboard in a real browser (what `make dashboard-test` runs; part of
# `make smoke`, so CI runs it).
#
#   A coordinator (dashboard and /metrics on a free loopback port) and workers w1, w2;
#   one job of 12 sleep tasks. Headless Chromium, driven through chromedriver by
#   Selenium (in ./.venv), opens the dashboard and the test asserts from the DOM that:
#   - both workers appear as active;
#   - the job's progress bar reaches 100%;
#   - after w1 is killed (SIGKILL) its row shows it failed, and the event list says so.
#   It saves a screenshot (PNG) of the page at the end to $DASHBOARD_OUT (default
#   $CARGO_TARGET_DIR/dashboard-test/dashboard.png).
#
# Chromium and chromedriver come from Debian (`apt-get install chromium chromium-driver`,
# done here when they are missing and this runs as root); Selenium is installed into
# ./.venv. Where neither can be had, it says so and exits 0 as SKIPPED (the only skip).
#
# Usage: scripts/dashboard-test.sh   (ROLLOUT=path/to/rollout, KEEP_DASHBOARD=1)
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)

ROLLOUT=${ROLLOUT:-${CARGO_TARGET_DIR:-$HOME/.cache/rollout/target}/debug/rollout}
OUT=${DASHBOARD_OUT:-${CARGO_TARGET_DIR:-$HOME/.cache/rollout/target}/dashboard-test}
LOG_PREFIX=dashboard
source scripts/lib/cluster.sh

[[ -x $ROLLOUT ]] || die "no rollout binary at $ROLLOUT (run \`make build\` first, or set ROLLOUT)"

skip() {
    echo "dashboard: SKIPPED: $*" >&2
    exit 0
}

if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then
    if [[ $(id -u) == 0 ]] && command -v apt-get >/dev/null; then
        say "installing chromium and chromium-driver (apt-get)"
        { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver; } \
            >/tmp/rollout-dashboard-apt.log 2>&1 || skip "apt-get install chromium chromium-driver failed (see /tmp/rollout-dashboard-apt.log)"
    else
        skip "chromium and chromedriver are not installed, and this is not root with apt-get to install them"
    fi
fi
scripts/python-venv.sh || die "scripts/python-venv.sh failed"
PY=$root/.venv/bin/python
if ! "$PY" -c 'import selenium' 2>/dev/null; then
    say "installing selenium into ./.venv"
    "$PY" -m pip install -q 'selenium>=4.20,<5' >/tmp/rollout-dashboard-pip.log 2>&1 ||
        skip "pip install selenium failed (see /tmp/rollout-dashboard-pip.log)"
fi

tmp=$(mktemp -d "${TMPDIR:-/tmp}/rollout-dashboard.XXXXXX")
cfg=$tmp/cluster.toml
pids=()
ok=0
on_exit() {
    stop_pids
    finish_tmp dashboard "${KEEP_DASHBOARD:-}" "config, logs"
}
trap on_exit EXIT
trap 'exit 130' INT TERM

port=$(free_port)
web=$(free_port)
cluster_config "$port" "$tmp" | sed "s/^listen_addr = \"127.0.0.1:0\"$/listen_addr = \"127.0.0.1:$web\"/" >"$cfg"
grep -q "127.0.0.1:$web" "$cfg" || die "the config does not set the dashboard's port"
"$ROLLOUT" certs init --config "$cfg" >/dev/null
for w in w1 w2; do "$ROLLOUT" certs issue --config "$cfg" --worker "$w" >/dev/null; done
"$ROLLOUT" coordinator --config "$cfg" --history /dev/null 2>"$tmp/coordinator.log" &
pids+=($!)
declare -A worker_pid
for w in w1 w2; do
    "$ROLLOUT" worker --config "$cfg" --id "$w" --slots 4 --history /dev/null 2>"$tmp/$w.log" &
    worker_pid[$w]=$!
    pids+=($!)
done
tasks=$tmp/tasks.jsonl
for _ in $(seq 1 12); do echo '{"plugin":"sleep","payload":"300","job":"dashboard-demo"}'; done >"$tasks"
deadline=$(($(now_ms) + 30000))
until "$ROLLOUT" submit --config "$cfg" --no-wait "$tasks" >"$tmp/submit.out" 2>&1; do
    (($(now_ms) < deadline)) || die "the job could not be submitted: $(tail -3 "$tmp/submit.out")"
    sleep 0.2
done
mkdir -p "$OUT"
say "dashboard at http://127.0.0.1:$web/ (headless Chromium)"
disown "${worker_pid[w1]}" # the browser test kills it: no "Killed" notice from bash

"$PY" - "http://127.0.0.1:$web/" "${worker_pid[w1]}" "$OUT/dashboard.png" <<'PY' || die "the dashboard did not show what the cluster did"
import os, signal, sys, time

from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By

url, w1_pid, shot = sys.argv[1], int(sys.argv[2]), sys.argv[3]
options = webdriver.ChromeOptions()
options.binary_location = "/usr/bin/chromium"
for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=1400,1100"):
    options.add_argument(arg)
driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)


def wait_for(what, check, within=30):
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except Exception:  # noqa: BLE001 - the DOM is being rewritten under us
            pass
        time.sleep(0.1)
    driver.save_screenshot(shot)
    sys.exit(f"timed out waiting for {what} (screenshot {shot}); page text:\n{driver.find_element(By.TAG_NAME, 'body').text}")


def state(worker):
    rows = driver.find_elements(By.CSS_SELECTOR, f'tr[data-worker="{worker}"]')
    return rows[0].get_attribute("data-state") if rows else None


try:
    driver.get(url)
    wait_for("both workers active", lambda: state("w1") == "active" and state("w2") == "active")
    print("dashboard: both workers shown active")

    def progress():
        rows = driver.find_elements(By.CSS_SELECTOR, "tr[data-job]")
        return [r for r in rows if "dashboard-demo" in r.text and r.get_attribute("data-progress") == "100"]

    wait_for("the job at 100%", progress)
    row = progress()[0]
    print(f"dashboard: job shown at 100%: {row.text!r}")
    os.kill(w1_pid, signal.SIGKILL)
    wait_for("w1 shown failed", lambda: state("w1") == "failed")
    wait_for("the declaration in the event list", lambda: any(
        "w1" in li.text for li in driver.find_elements(By.CSS_SELECTOR, '#events li[data-kind="declared_failed"]')))
    assert state("w2") == "active", "w2 must stay active"
    cell = driver.find_element(By.CSS_SELECTOR, 'tr[data-worker="w1"] td.state-failed')
    print(f"dashboard: w1 shown {cell.text!r} after SIGKILL; event list: "
          f"{driver.find_elements(By.CSS_SELECTOR, '#events li[data-kind=declared_failed]')[0].text!r}")
    assert driver.find_element(By.ID, "conn").text == "live"
    time.sleep(1.5)  # one more status event, so the charts have points
    driver.save_screenshot(shot)
    print(f"dashboard: screenshot {shot}")
finally:
    driver.quit()
PY
alive=()
for pid in "${pids[@]}"; do [[ $pid == "${worker_pid[w1]}" ]] || alive+=("$pid"); done
pids=("${alive[@]}")
ok=1
say "passed"

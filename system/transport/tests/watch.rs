//! WatchResults: a job's outcomes streamed as its tasks end, resumable from any seq
//! without missing or repeating a task.

mod common;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use rollout_proto::transport as pb;
use rollout_transport::operator_client;

async fn follow(
    operator: &mut rollout_proto::transport::operator_client::OperatorClient<tonic::transport::Channel>,
    job: u64,
    after_seq: u64,
) -> Vec<(Instant, pb::TaskOutcome)> {
    let request = pb::WatchResultsRequest { job, after_seq, include_bytes: true };
    let mut stream = operator.watch_results(request).await.expect("watch").into_inner();
    let mut got = Vec::new();
    while let Some(outcome) = tokio::time::timeout(Duration::from_secs(30), stream.message())
        .await
        .expect("the stream ends by itself once every task ended")
        .expect("no error")
    {
        got.push((Instant::now(), outcome));
    }
    got
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outcomes_stream_as_tasks_end_and_resume_from_any_seq() {
    let started = common::start(common::fast_config(), &["w1", "w2"]).await;
    let (stop_tx, workers) = common::spawn_workers(&started, &["w1", "w2"]);
    let mut operator = operator_client(&started.config, "ops", Some(&started.addr)).expect("operator");
    // 20 sleeps of 100..1050 ms on 8 slots: they end over about a second and a half.
    const TASKS: u32 = 20;
    let tasks = (0..TASKS)
        .map(|i| pb::TaskSpec {
            plugin: "sleep".into(),
            method: "run".into(),
            payload: (100 + 50 * i).to_string().into_bytes(),
            gpus: 0,
            deadline_ms: 30_000,
            inputs: Vec::new(),
        })
        .collect();
    let request = pb::SubmitJobRequest { name: "watched".into(), tasks, idempotency_key: String::new() };
    let job = operator.submit_job(request).await.expect("accepted").into_inner().job;

    let all = follow(&mut operator, job, 0).await;
    let indexes: Vec<u32> =
        all.iter().map(|(_, o)| o.result.as_ref().and_then(|r| r.task).expect("task").index).collect();
    assert_eq!(indexes.iter().copied().collect::<BTreeSet<_>>().len(), TASKS as usize, "each task once: {indexes:?}");
    assert_eq!(indexes.len(), TASKS as usize);
    assert!(all.windows(2).all(|w| w[0].1.seq < w[1].1.seq), "in the order they ended");
    for (_, o) in &all {
        let r = o.result.as_ref().expect("result");
        assert_eq!(r.state, pb::TaskState::Committed as i32);
        assert_eq!(r.result, (100 + 50 * r.task.expect("task").index).to_string().into_bytes());
    }
    // Streamed as they ended, not at the end.
    let spread = all.last().expect("last").0 - all[0].0;
    assert!(spread > Duration::from_millis(400), "all outcomes came within {spread:?}");

    // Resuming after the 7th outcome gives exactly the 13 after it, in the same order.
    let resumed = follow(&mut operator, job, all[6].1.seq).await;
    let want: Vec<u64> = all[7..].iter().map(|(_, o)| o.seq).collect();
    assert_eq!(resumed.iter().map(|(_, o)| o.seq).collect::<Vec<_>>(), want);
    // After the last: nothing, and the stream ends.
    assert!(follow(&mut operator, job, all.last().expect("last").1.seq).await.is_empty());
    // An unknown job is NOT_FOUND.
    let err = operator
        .watch_results(pb::WatchResultsRequest { job: 999_999, after_seq: 0, include_bytes: false })
        .await
        .expect_err("unknown job");
    assert_eq!(err.code(), tonic::Code::NotFound);

    let _ = stop_tx.send(true);
    for w in workers {
        let _ = tokio::time::timeout(Duration::from_secs(5), w).await;
    }
    started.coordinator.shutdown().await.expect("clean shutdown");
}

//! Blobs: PutBlob (streamed, idempotent by content, bounded by limits.max_blob_bytes),
//! GetBlob (streamed back, verified) and ListBlobs, over mTLS with an operator certificate.

mod common;

use rollout_core::ContentId;
use rollout_core::traits::ObjectStore as _;
use rollout_proto::transport as pb;
use rollout_transport::operator_client;

fn chunks(bytes: &[u8], size: usize) -> impl tokio_stream::Stream<Item = pb::BlobChunk> + Send + 'static {
    let owned: Vec<pb::BlobChunk> = bytes.chunks(size).map(|c| pb::BlobChunk { data: c.to_vec() }).collect();
    tokio_stream::iter(owned)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blob_goes_up_once_comes_back_whole_and_the_limit_keeps_nothing() {
    let mut config = common::fast_config();
    config.limits.max_blob_bytes = 8 * 1024 * 1024;
    let started = common::start(config, &[]).await;
    let mut ops = operator_client(&started.config, "ops", Some(&started.addr)).expect("operator");

    // 3 MiB and a bit, in uneven chunks.
    let blob: Vec<u8> = (0..3 * 1024 * 1024 + 17).map(|i| (i * 31 % 251) as u8).collect();
    let id = ContentId::of(&blob);
    let info = ops.put_blob(chunks(&blob, 700_001)).await.expect("stored").into_inner();
    assert_eq!(info.content_id, id.as_bytes().to_vec());
    assert_eq!(info.size_bytes, blob.len() as u64);
    // The same bytes again, chunked otherwise: the same id, stored once.
    let again = ops.put_blob(chunks(&blob, 1 << 20)).await.expect("stored").into_inner();
    assert_eq!(again.content_id, info.content_id);
    let listed = ops.list_blobs(pb::ListBlobsRequest {}).await.expect("list").into_inner().blobs;
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!((listed[0].content_id.clone(), listed[0].size_bytes), (info.content_id.clone(), info.size_bytes));

    let mut stream =
        ops.get_blob(pb::GetBlobRequest { content_id: id.as_bytes().to_vec() }).await.expect("get").into_inner();
    let mut back = Vec::new();
    while let Some(chunk) = stream.message().await.expect("no error") {
        assert!(chunk.data.len() <= 1024 * 1024);
        back.extend_from_slice(&chunk.data);
    }
    assert!(back == blob, "the blob came back different ({} bytes)", back.len());

    // Over the limit: refused naming it, and nothing of it is kept.
    let big = vec![7u8; 8 * 1024 * 1024 + 1];
    let err = ops.put_blob(chunks(&big, 1 << 20)).await.expect_err("over the limit");
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(err.message().contains("limits.max_blob_bytes"), "{}", err.message());
    let listed = ops.list_blobs(pb::ListBlobsRequest {}).await.expect("list").into_inner().blobs;
    assert_eq!(listed.len(), 1, "the refused upload left nothing: {listed:?}");
    let tmp = started.config.storage.data_dir.join("blobs/tmp");
    assert_eq!(std::fs::read_dir(&tmp).expect("tmp dir").count(), 0, "no partial upload left in {}", tmp.display());

    // Unknown and malformed ids.
    let err = ops.get_blob(pb::GetBlobRequest { content_id: vec![0; 32] }).await.expect_err("unknown");
    assert_eq!(err.code(), tonic::Code::NotFound);
    let err = ops.get_blob(pb::GetBlobRequest { content_id: vec![0; 5] }).await.expect_err("malformed");
    assert!(err.code() == tonic::Code::InvalidArgument && err.message().contains("get_blob.content_id"), "{err:?}");
    started.coordinator.shutdown().await.expect("clean shutdown");
}

/// Retention: a blob no held task names goes once unused for tasks.job_retention; one a
/// held task names stays however old; a submit naming a blob counts as a use.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unnamed_blobs_go_after_the_retention_and_named_ones_stay() {
    use std::time::{Duration, SystemTime};

    let started = common::start(common::fast_config(), &[]).await;
    let mut ops = operator_client(&started.config, "ops", Some(&started.addr)).expect("operator");
    let put = |bytes: &'static [u8]| pb::BlobChunk { data: bytes.to_vec() };
    let named = ops.put_blob(tokio_stream::iter([put(b"named by a task")])).await.expect("put").into_inner();
    let loose = ops.put_blob(tokio_stream::iter([put(b"named by nothing")])).await.expect("put").into_inner();
    let fresh = ops.put_blob(tokio_stream::iter([put(b"uploaded just now")])).await.expect("put").into_inner();
    let task = pb::TaskSpec {
        plugin: "echo".into(),
        method: "run".into(),
        payload: b"x".to_vec(),
        gpus: 0,
        deadline_ms: 0,
        inputs: vec![named.content_id.clone()],
    };
    let request = pb::SubmitJobRequest { name: "holds".into(), tasks: vec![task], idempotency_key: String::new() };
    ops.submit_job(request).await.expect("accepted");

    let store = rollout_cloud_local::FsObjectStore::open(started.config.storage.data_dir.join("blobs")).expect("store");
    let id = |b: &pb::BlobInfo| ContentId::from_digest(b.content_id.clone().try_into().expect("32 bytes"));
    // Age the named and the loose blob past a day's retention; leave the fresh one.
    let long_ago = SystemTime::now() - Duration::from_secs(3 * 86_400);
    for b in [&named, &loose] {
        let file = std::fs::File::options().write(true).open(store.object_path(&id(b))).expect("open");
        file.set_modified(long_ago).expect("age it");
    }
    let report = rollout_transport::blob_retention::sweep(
        &store,
        &*started.coordinator.storage,
        Duration::from_secs(86_400),
        SystemTime::now(),
    )
    .expect("sweeps");
    assert_eq!((report.kept, report.removed), (2, 1), "{report:?}");
    assert!(store.exists(&id(&named)).expect("check"), "a blob a held task names stays");
    assert!(store.exists(&id(&fresh)).expect("check"), "a blob used within the retention stays");
    assert!(!store.exists(&id(&loose)).expect("check"), "an unnamed, unused blob goes");
    let listed = ops.list_blobs(pb::ListBlobsRequest {}).await.expect("list").into_inner().blobs;
    assert_eq!(listed.len(), 2);
    started.coordinator.shutdown().await.expect("clean shutdown");
}

//! Event Hubs' checkpoint store against a real Blob service: a private Azurite (Microsoft's
//! Azure Storage emulator). Checkpoints are written and read back in the SDKs' layout, a
//! partition's ownership is claimed only with the ETag last seen (so two consumers cannot both
//! take it), and a bad key is refused by Azurite's own Shared Key check.

#![cfg(feature = "eventhubs")]
#![allow(clippy::unwrap_used)]

use daprd_components::eventhubs::checkpoints::{
    Checkpoint, CheckpointError, CheckpointStore, StorageAccount,
};
use daprd_testkit::azurite::Azurite;
use daprd_testkit::conformance::random_name;

fn store(azurite: &Azurite, container: &str, group: &str) -> CheckpointStore {
    let account = StorageAccount::from_connection_string(&azurite.connection_string()).unwrap();
    CheckpointStore::new(
        account,
        container,
        "My-NS.servicebus.windows.net",
        "Orders",
        group,
    )
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checkpoints_and_ownership_round_trip_through_blob_storage() {
    let azurite = Azurite::start().await;
    let container = random_name("checkpoints").to_ascii_lowercase();
    let s = store(&azurite, &container, "$Default");
    s.ensure_container().await.unwrap();
    s.ensure_container().await.unwrap(); // it exists: as good
    assert!(s.checkpoints().await.unwrap().is_empty());

    for (partition, offset, seq) in [("0", "100", 5), ("1", "2048", 9), ("0", "160", 6)] {
        s.set_checkpoint(&Checkpoint {
            partition: partition.into(),
            offset: Some(offset.into()),
            sequence_number: Some(seq),
        })
        .await
        .unwrap();
    }
    let mut got = s.checkpoints().await.unwrap();
    got.sort_by(|a, b| a.partition.cmp(&b.partition));
    assert_eq!(
        got,
        [
            Checkpoint {
                partition: "0".into(),
                offset: Some("160".into()),
                sequence_number: Some(6),
            },
            Checkpoint {
                partition: "1".into(),
                offset: Some("2048".into()),
                sequence_number: Some(9),
            },
        ]
    );
    // another consumer group sees none of them
    let other = store(&azurite, &container, "audit");
    assert!(other.checkpoints().await.unwrap().is_empty());

    // ownership: the first claim of a partition no one held wins, a second one loses
    let a = s.claim("0", "consumer-a", None).await.unwrap().unwrap();
    assert!(s.claim("0", "consumer-b", None).await.unwrap().is_none());
    // a claim with a stale ETag loses; with the current one it wins
    let b = s
        .claim("0", "consumer-b", Some(&a.etag))
        .await
        .unwrap()
        .unwrap();
    assert!(s
        .claim("0", "consumer-a", Some(&a.etag))
        .await
        .unwrap()
        .is_none());
    let owners = s.ownership().await.unwrap();
    assert_eq!(owners.len(), 1);
    assert_eq!(
        (
            owners[0].partition.as_str(),
            owners[0].owner.as_str(),
            owners[0].etag.as_str()
        ),
        ("0", "consumer-b", b.etag.as_str())
    );
    assert!(owners[0].last_modified_ms > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_key_is_refused_by_blob_storage() {
    let azurite = Azurite::start().await;
    let cs = azurite
        .connection_string()
        .replace("AccountKey=Eby8", "AccountKey=AAAA");
    let account = StorageAccount::from_connection_string(&cs).unwrap();
    let s = CheckpointStore::new(account, "checkpoints", "ns", "hub", "cg").unwrap();
    match s.ensure_container().await {
        Err(CheckpointError::Status { status: 403, .. }) => {}
        other => panic!("expected 403, got {other:?}"),
    }
}

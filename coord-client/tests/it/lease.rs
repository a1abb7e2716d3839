use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use coord_client::Client;

use crate::harness::{Coordinator, wait_until};

#[tokio::test]
async fn revoking_a_lease_deletes_its_keys_and_a_second_revoke_is_fine() {
    let c = Coordinator::start().await;
    let client = Client::connect([c.url()]).expect("client");
    let (id, ttl) = client.lease_grant(30).await.expect("grant");
    assert_eq!(ttl, 30);
    client.put("/leased", "v", id).await.expect("put");
    assert!(client.lease_keep_alive_once(id).await.expect("keep-alive") > 0);
    client.lease_revoke(id).await.expect("revoke");
    assert!(client.get("/leased").await.expect("get").0.is_none());
    client
        .lease_revoke(id)
        .await
        .expect("revoking again is not an error");
    assert_eq!(
        client.lease_keep_alive_once(id).await.expect("keep-alive"),
        0
    );
}

#[tokio::test]
async fn a_kept_lease_outlives_its_ttl() {
    let c = Coordinator::start().await;
    let client = Client::connect([c.url()]).expect("client");
    let kc = client.clone();
    let keeper = client
        .keep_lease(2, move |lease| {
            let kc = kc.clone();
            async move { kc.put("/alive", "yes", lease).await.map(|_| ()) }
        })
        .await
        .expect("keep lease");
    // Three TTLs: an unkept 2 s lease would be gone by then.
    let until = std::time::Instant::now() + Duration::from_secs(6);
    while std::time::Instant::now() < until {
        assert!(
            client.get("/alive").await.expect("get").0.is_some(),
            "key vanished"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let id = keeper.lease_id();
    keeper.revoke().await.expect("revoke");
    assert!(client.get("/alive").await.expect("get").0.is_none());
    assert_eq!(client.lease_time_to_live(id).await.expect("ttl"), -1);
}

#[tokio::test]
async fn a_lease_lost_anyway_is_granted_again_and_the_owner_re_registers() {
    let c = Coordinator::start().await;
    let client = Client::connect([c.url()]).expect("client");
    let grants = Arc::new(AtomicUsize::new(0));
    let (kc, g) = (client.clone(), grants.clone());
    let keeper = client
        .keep_lease(3, move |lease| {
            let (kc, g) = (kc.clone(), g.clone());
            async move {
                g.fetch_add(1, Ordering::SeqCst);
                kc.put("/me", lease.to_string(), lease).await.map(|_| ())
            }
        })
        .await
        .expect("keep lease");
    let first = keeper.lease_id();
    // What an outage longer than the TTL does: the lease is gone, and the key with it.
    client
        .lease_revoke(first)
        .await
        .expect("revoke behind its back");
    assert!(client.get("/me").await.expect("get").0.is_none());

    wait_until(
        Duration::from_secs(10),
        "a new lease and the key written again",
        || {
            let client = client.clone();
            let keeper_id = keeper.lease_id();
            async move {
                keeper_id != first
                    && client
                        .get("/me")
                        .await
                        .ok()
                        .and_then(|(kv, _)| kv)
                        .is_some_and(|kv| kv.lease == keeper_id)
            }
        },
    )
    .await;
    assert_eq!(grants.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn a_kept_lease_survives_a_coordinator_restart() {
    let mut c = Coordinator::start().await;
    let client = Client::connect([c.url()]).expect("client");
    let kc = client.clone();
    let keeper = client
        .keep_lease(2, move |lease| {
            let kc = kc.clone();
            async move { kc.put("/svc", "x", lease).await.map(|_| ()) }
        })
        .await
        .expect("keep lease");
    c.restart().await;
    // Longer than the TTL after the restart: still there, kept by the task.
    let until = std::time::Instant::now() + Duration::from_secs(5);
    while std::time::Instant::now() < until {
        assert!(
            client.get("/svc").await.expect("get").0.is_some(),
            "key vanished"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    drop(keeper);
}

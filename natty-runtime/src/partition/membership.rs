//! Who is in a partitioned group right now (issue 19, step 3 of `docs/design/partitions.md`).
//!
//! Each instance keeps one key of its own in the group's KV bucket, `<group>.<instance>`,
//! written with a per-key TTL (`Nats-TTL`, nats-server 2.11+) and written again every third of
//! it; it deletes the key when it leaves cleanly. The live members are the keys present: one
//! that stopped renewing (killed, frozen, cut off from the server) drops out when its TTL runs
//! out on the server, judged by the server's clock, not by anyone's view of it.

use std::time::Duration;

use async_nats::HeaderMap;
use bytes::Bytes;
use futures_util::StreamExt;

use crate::error::BoxError;
use crate::publish::Client;

/// The header a KV delete carries.
const KV_OPERATION: &str = "KV-Operation";
/// The per-message TTL header.
const TTL: &str = "Nats-TTL";

/// One instance's membership of a group: its key, kept alive until [`leave`](Membership::leave)
/// or drop (which stops the renewals, so the key expires).
pub(crate) struct Membership {
    client: Client,
    /// The bucket, looked up once: every poll lists its keys.
    store: async_nats::jetstream::kv::Store,
    prefix: String,
    subject: String,
    renewing: tokio::task::JoinHandle<()>,
}

impl Membership {
    /// Joins `group` in `bucket` (which must accept per-key TTLs: see
    /// `leader::provision_ttl_bucket`) as `instance`, announced for `ttl` (whole seconds, at
    /// least one: the server's resolution) and renewed every third of it.
    pub(crate) async fn join(
        client: &Client,
        bucket: &str,
        group: &str,
        instance: &str,
        ttl: Duration,
    ) -> Result<Membership, BoxError> {
        let seconds = ttl.as_secs().max(1) + u64::from(ttl.subsec_nanos() > 0);
        let subject = format!("$KV.{bucket}.{group}.{instance}");
        let store = client.jetstream().get_key_value(bucket).await?;
        announce(client, &subject, seconds).await?;
        let renewing = tokio::spawn({
            let (client, subject) = (client.clone(), subject.clone());
            async move {
                let every = Duration::from_secs(seconds) / 3;
                loop {
                    tokio::time::sleep(every).await;
                    if let Err(error) = announce(&client, &subject, seconds).await {
                        // The next renewal tries again; a third missed in a row ends the
                        // membership on the server, which is what it should then mean.
                        tracing::warn!(subject, error = %crate::error::chain(&*error), "cannot renew the group membership");
                    }
                }
            }
        });
        Ok(Membership {
            client: client.clone(),
            store,
            prefix: format!("{group}."),
            subject,
            renewing,
        })
    }

    /// The group's live members, by instance name, sorted.
    pub(crate) async fn members(&self) -> Result<Vec<String>, BoxError> {
        let mut keys = self.store.keys().await?;
        let mut members = Vec::new();
        while let Some(key) = keys.next().await {
            if let Some(instance) = key?.strip_prefix(&self.prefix) {
                members.push(instance.to_string());
            }
        }
        members.sort_unstable();
        Ok(members)
    }

    /// The bucket the membership is kept in.
    pub(crate) fn store(&self) -> &async_nats::jetstream::kv::Store {
        &self.store
    }

    /// Leaves the group at once: stops renewing and deletes the key, so the others see it go
    /// without waiting for the TTL (which ends it anyway if the delete is lost).
    pub(crate) async fn leave(self) {
        self.renewing.abort();
        let mut headers = HeaderMap::new();
        headers.insert(KV_OPERATION, "DEL");
        let deleted = async {
            self.client
                .jetstream()
                .publish_with_headers(self.subject.clone(), headers, Bytes::new())
                .await?
                .await
        };
        if let Err(error) = tokio::time::timeout(Duration::from_secs(2), deleted)
            .await
            .unwrap_or_else(|_| {
                Err(async_nats::jetstream::context::PublishError::new(
                    async_nats::jetstream::context::PublishErrorKind::TimedOut,
                ))
            })
        {
            tracing::warn!(subject = self.subject, error = %crate::error::chain(&error), "cannot leave the group at once; the membership ends with its TTL");
        }
    }
}

impl Drop for Membership {
    fn drop(&mut self) {
        self.renewing.abort();
    }
}

/// Writes the member's key with its TTL.
async fn announce(client: &Client, subject: &str, seconds: u64) -> Result<(), BoxError> {
    let mut headers = HeaderMap::new();
    headers.insert(TTL, format!("{seconds}s").as_str());
    client
        .jetstream()
        .publish_with_headers(subject.to_string(), headers, Bytes::from_static(b"{}"))
        .await?
        .await?;
    Ok(())
}

#[cfg(all(test, feature = "testing"))]
mod tests {
    use std::time::Duration;

    use super::Membership;
    use crate::config::{Config, Provision};
    use crate::publish::Client;
    use crate::testing::NatsServer;

    async fn members_are(membership: &Membership, expected: &[&str], within: Duration) {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let members = membership.members().await.expect("the members");
            if members == expected {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "expected {expected:?} within {within:?}, saw {members:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Three instances join and see one another; one leaves and is gone at once; one is
    /// dropped without leaving (as a killed process stops renewing) and is gone once its TTL
    /// runs out on the server, not before.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn members_join_leave_and_expire() {
        let server = NatsServer::start().await.expect("nats-server");
        let config = Config::from_lookup(|_| None).expect("config");
        let client = Client::connect_with(&config, &server.url()).await.expect("connect");
        crate::leader::provision_ttl_bucket(
            client.jetstream(),
            "groups",
            "test",
            Provision::CreateOrUpdate,
            "a test",
            1,
        )
        .await
        .expect("a bucket with per-key TTLs");
        let ttl = Duration::from_secs(2);
        let a = Membership::join(&client, "groups", "orders_ledger", "a", ttl)
            .await
            .unwrap();
        let b = Membership::join(&client, "groups", "orders_ledger", "b", ttl)
            .await
            .unwrap();
        let c = Membership::join(&client, "groups", "orders_ledger", "c", ttl)
            .await
            .unwrap();
        // Another group in the same bucket is not this one.
        let other = Membership::join(&client, "groups", "other", "z", ttl).await.unwrap();
        members_are(&a, &["a", "b", "c"], Duration::from_secs(5)).await;
        // Renewed: still there after several TTLs.
        tokio::time::sleep(ttl * 3).await;
        members_are(&b, &["a", "b", "c"], Duration::ZERO).await;

        c.leave().await;
        members_are(&a, &["a", "b"], Duration::from_millis(500)).await;

        let dropped_at = tokio::time::Instant::now();
        drop(b);
        members_are(&a, &["a"], ttl * 3).await;
        assert!(
            dropped_at.elapsed() >= ttl / 3,
            "a member that stopped renewing stays until its TTL runs out: {:?}",
            dropped_at.elapsed()
        );
        members_are(&other, &["z"], Duration::ZERO).await;
    }
}

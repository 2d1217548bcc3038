use natty_runtime::prelude::*;

#[derive(serde::Deserialize)]
struct Feature {
    enabled: bool,
}

#[kv_watch(bucket = "config", key = "features.>", history = true)]
async fn on_feature(change: KvChange<Feature>) -> Result<(), std::io::Error> {
    let _ = (change.key, change.revision, change.value.map(|f| f.enabled));
    Ok(())
}

fn main() {}

use natty_runtime::prelude::*;

#[derive(serde::Deserialize)]
struct Feature {
    enabled: bool,
}

#[kv_watch(key = "features.>")]
async fn on_feature(change: KvChange<Feature>) {
    let _ = change.value.map(|f| f.enabled);
}

fn main() {}

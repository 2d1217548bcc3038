use natty_runtime::kv_bucket;

#[kv_bucket(name = "config", histroy = 5)]
struct Config;

fn main() {}

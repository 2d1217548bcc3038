use natty_runtime::kv_bucket;

#[kv_bucket(name = "app.config")]
struct Config;

fn main() {}

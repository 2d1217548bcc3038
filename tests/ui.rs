//! Wrong macro arguments are compile errors that point at the token at fault.
#[test]
fn ui() {
    let t = trybuild::TestCases::new();
    t.pass("ui/pass/*.rs");
    t.compile_fail("ui/consumer/fail/*.rs");
    t.compile_fail("ui/stream/fail/*.rs");
    t.compile_fail("ui/core/fail/*.rs");
    t.compile_fail("ui/payload/fail/*.rs");
    t.compile_fail("ui/leader/fail/*.rs");
    t.compile_fail("ui/bucket/fail/*.rs");
    t.compile_fail("ui/capture/fail/*.rs");
    t.compile_fail("ui/schedule/fail/*.rs");
}

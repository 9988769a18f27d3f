/* Stand-in for the macOS SDK header: lets `cargo check` compile ring's C objects for
   aarch64-apple-darwin without an SDK. The objects are never linked or run. */
#define assert(x) ((void)0)

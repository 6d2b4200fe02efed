// Every Dapper call in this assembly is replaced at build time by code Dapper.AOT generates
// (C# interceptors): no reflection or ref-emit at run time, as the NativeAOT programs require.
[module: Dapper.DapperAot]

// Every Dapper call in this assembly is replaced at build time by code Dapper.AOT generates
// (C# interceptors): no reflection or ref-emit at run time, as the NativeAOT programs require.
// Call no SqlMapper helper (AsList, ...) directly: touching SqlMapper runs its static constructor,
// whose reflection makes a NativeAOT publish warn (IL2104, IL3053 for the assembly 'Dapper').
[module: Dapper.DapperAot]

namespace Kvm.IntegrationTests;

/// <summary>
/// Tests whose verdict is a rate the VMM must hold (a bandwidth limit, shares of a link): they run
/// alone, after the parallel ones, so that a guest starved of CPU by another test's VM does not
/// send below the rate it is held to. The rates stay far below what a guest sends when it runs.
/// </summary>
[CollectionDefinition(Name, DisableParallelization = true)]
public sealed class QuietCollection
{
    public const string Name = "quiet";
}

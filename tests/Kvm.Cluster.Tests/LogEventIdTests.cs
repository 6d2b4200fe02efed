using System.Reflection;
using Microsoft.Extensions.Logging;

namespace Kvm.Cluster.Tests;

/// <summary>
/// Log event ids are stable and name one event each: kvmd's log (and the journal) carries the VMM's
/// events beside its own, so two events of different layers with one id could not be told apart.
/// </summary>
public sealed class LogEventIdTests
{
    /// <summary>Every assembly of the programs that logs (Kvm.Cluster references all the others).</summary>
    private static IEnumerable<Assembly> Layers()
    {
        var seen = new HashSet<string>(StringComparer.Ordinal);
        var todo = new Queue<Assembly>([typeof(Kvmd).Assembly]);
        while (todo.TryDequeue(out var a))
        {
            if (!seen.Add(a.GetName().Name!))
                continue;
            yield return a;
            foreach (var name in a.GetReferencedAssemblies().Where(n => n.Name!.StartsWith("Kvm.", StringComparison.Ordinal)))
                todo.Enqueue(Assembly.Load(name));
        }
    }

    [Fact]
    public void EveryLoggerMessageHasAnIdOfItsOwn()
    {
        var events = (from a in Layers()
                      from t in a.GetTypes()
                      from m in t.GetMethods(BindingFlags.Static | BindingFlags.Instance | BindingFlags.Public | BindingFlags.NonPublic | BindingFlags.DeclaredOnly)
                      let attribute = m.GetCustomAttribute<LoggerMessageAttribute>()
                      where attribute is not null
                      select (attribute.EventId, Where: $"{t.FullName}.{m.Name}")).ToArray();
        Assert.True(events.Length > 50, $"only {events.Length} logger messages found: the scan missed assemblies");
        var shared = events.GroupBy(e => e.EventId).Where(g => g.Count() > 1)
            .Select(g => $"{g.Key}: {string.Join(", ", g.Select(e => e.Where))}").ToArray();
        Assert.True(shared.Length == 0, "event ids used more than once:\n" + string.Join("\n", shared));
    }
}

using System.Buffers;
using Kvm.Rpc;

namespace Kvm.Inventory;

/// <summary>
/// The names of VMs and hosts as the schema's check constraints on vms.name and hosts.name have
/// them (<c>^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$</c>; a test holds the two to agreement), so that a
/// caller can refuse a name that cannot exist before it costs a query, a lock, or a message that
/// quotes it whole.
/// </summary>
public static class InventoryNames
{
    public const int MaxLength = 63;

    /// <summary>The rule, as an error message gives it.</summary>
    public const string Rule = "use 1 to 63 letters, digits, '.', '_' and '-', starting with a letter or digit";

    private static readonly SearchValues<char> Allowed = SearchValues.Create("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._-");

    public static bool IsValid(string? name) =>
        name is { Length: >= 1 and <= MaxLength } && char.IsAsciiLetterOrDigit(name[0]) && !name.AsSpan().ContainsAnyExcept(Allowed);

    /// <summary>The refusal of a name no VM or host can have: "<paramref name="what"/> 'NAME' is not allowed: RULE".</summary>
    public static string NotAllowed(string what, string name) => $"{what} {Quote(name)} is not allowed: {Rule}";

    /// <summary>A name a client sent, for a message: quoted, control characters shown as \xNN, a long one cut short with its length.</summary>
    public static string Quote(string name) =>
        name.Length > RpcDispatcher.PrintableLength ? $"'{RpcDispatcher.Printable(name)}' ({name.Length} characters)" : $"'{RpcDispatcher.Printable(name)}'";
}

using System.Runtime.CompilerServices;

// The AML encoder and the table builders are internal; their unit tests check encodings directly.
[assembly: InternalsVisibleTo("Kvm.Vmm.Tests")]

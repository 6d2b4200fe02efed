using System.CommandLine;
using Kvm.Cli;

return VmctlCommands.Build().Invoke(args);

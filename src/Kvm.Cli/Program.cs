using System.CommandLine;
using Kvm.Cli;
using Kvm.Vmm.Machine;

ForegroundConsole.UsePlainStandardStreams();
return VmctlCommands.Build().Invoke(args);

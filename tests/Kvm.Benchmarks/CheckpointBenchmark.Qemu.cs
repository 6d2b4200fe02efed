using System.Diagnostics;
using System.Globalization;
using System.Net.Sockets;
using System.Text.Json;
using System.Text.RegularExpressions;
using Kvm.Tests.Shared;

/// <summary>The peer of the checkpoint part: QEMU 7.2's background snapshot of the same guest.</summary>
internal static partial class CheckpointBenchmark
{
    /// <summary>
    /// QEMU running the dirty guest, checkpointed with the background-snapshot capability into a
    /// file; returns its figures and query-migrate's own total-time (s). A step QEMU refuses fails
    /// with QEMU's own message.
    /// </summary>
    private static (Checkpoint Figures, double ReportedTotal) CheckpointQemu(string folder, int run, ulong size, TimeSpan limit)
    {
        string qemu = TestEnvironment.FindOnPath("qemu-system-x86_64")!;
        string socket = Path.Combine(folder, "qmp.sock");
        File.Delete(socket);
        using var listener = new Socket(AddressFamily.Unix, SocketType.Stream, ProtocolType.Unspecified);
        listener.Bind(new UnixDomainSocketEndPoint(socket));
        listener.Listen(1);
        using var process = TestEnvironment.StartRedirected(qemu,
        [
            "-accel", "kvm", "-M", "microvm", "-nodefaults", "-no-user-config", "-display", "none", "-serial", "stdio",
            "-device", "isa-debug-exit,iobase=0xf4,iosize=0x04", "-smp", "1", "-m", $"{size >> 20}M",
            "-kernel", TestEnvironment.GuestKit, "-append", DirtyCmdline(size),
            "-chardev", $"socket,id=qmp,path={socket}", "-mon", "chardev=qmp,mode=control",
        ]);
        var stdout = process.StandardOutput.ReadToEndAsync();
        var stderr = process.StandardError.ReadToEndAsync();
        string Output()
        {
            if (!process.HasExited)
                return "";
            process.WaitForExit();
            return $" (QEMU exited with status {process.ExitCode}; stdout: '{stdout.Result.Trim()}', stderr: '{stderr.Result.Trim()}')";
        }
        try
        {
            using var qmp = LineClient.AcceptQmp(listener, socket, () => process.HasExited, limit);
            var progress = new DirtyProgress(size, gpa => ReadPhysical(qmp, gpa));
            progress.WaitWritten(limit, () => process.HasExited ? $"QEMU ended before the guest wrote its RAM{Output()}" : null);
            double before = progress.Rate(RateWindow);

            string file = Path.Combine(folder, $"qemu-{run}.mig"), done = file + ".done";
            Step("migrate-set-capabilities background-snapshot", () =>
                qmp.Qmp("migrate-set-capabilities", """{"capabilities":[{"capability":"background-snapshot","state":true}]}""").Dispose());
            Step("migrate-set-parameters max-bandwidth", () => qmp.Qmp("migrate-set-parameters", """{"max-bandwidth":1000000000000}""").Dispose());
            string uri = $"exec:cat > {file} && sync {file} && touch {done}";
            var (p0, t0) = (progress.Passes(), Stopwatch.GetTimestamp());
            Step("migrate", () => qmp.Qmp("migrate", $"{{\"uri\":{JsonSerializer.Serialize(uri)}}}").Dispose());
            JsonElement info;
            double p1;
            while (true)
            {
                using (var reply = qmp.Qmp("query-migrate"))
                    info = reply.RootElement.GetProperty("return").Clone();
                string status = info.TryGetProperty("status", out var s) ? s.GetString() ?? "" : "";
                if (status == "completed")
                {
                    p1 = progress.Passes();
                    break;
                }
                if (status is "failed" or "cancelled")
                    throw new BenchmarkFailure($"QEMU's background snapshot ended '{status}': {info.GetRawText()}{Output()}");
                if (Stopwatch.GetElapsedTime(t0) > limit)
                    throw new BenchmarkFailure($"QEMU's background snapshot did not complete within {limit.TotalSeconds:0} s: {info.GetRawText()}");
                Thread.Sleep(100);
            }
            double during = (p1 - p0) / Stopwatch.GetElapsedTime(t0).TotalSeconds;
            while (!File.Exists(done))
            {
                if (Stopwatch.GetElapsedTime(t0) > limit)
                    throw new BenchmarkFailure($"{done} did not appear within {limit.TotalSeconds:0} s (cat and sync of the stream)");
                Thread.Sleep(20);
            }
            double seconds = Stopwatch.GetElapsedTime(t0).TotalSeconds;
            // QEMU 7.2 says completed before it has worked out the migration's times (total-time 0 until then).
            for (int i = 0; i < 50 && (!info.TryGetProperty("total-time", out var tt) || tt.GetDouble() == 0); i++)
            {
                Thread.Sleep(100);
                using var reply = qmp.Qmp("query-migrate");
                info = reply.RootElement.GetProperty("return").Clone();
            }
            Console.Error.WriteLine($"{Mib(size)} qemu query-migrate: {info.GetRawText()}");
            double downtime = info.TryGetProperty("downtime", out var d) ? d.GetDouble() / 1000 : double.NaN;
            double reported = info.TryGetProperty("total-time", out var t) ? t.GetDouble() / 1000 : double.NaN;
            if (process.HasExited)
                throw new BenchmarkFailure($"QEMU ended during its snapshot{Output()}");
            long bytes = new FileInfo(file).Length;
            string detail = $"downtime {(double.IsNaN(downtime) ? "not reported" : $"{downtime * 1000:0} ms")}, total-time {reported:0.000} s, " +
                            $"to the synced file {seconds:0.000} s, {bytes >> 20} MiB stream; guest {during:0.0} passes/s during, {before:0.0} before";
            try
            {
                qmp.Qmp("quit").Dispose();
            }
            catch (BenchmarkFailure)
            {
                // QEMU may close the monitor before its reply.
            }
            process.WaitForExit(limit);
            File.Delete(file);
            File.Delete(done);
            if (double.IsNaN(downtime))
                throw new BenchmarkFailure($"QEMU's query-migrate has no downtime after its background snapshot: {info.GetRawText()}");
            return (new Checkpoint(downtime, seconds, before, during, bytes, detail), reported);
        }
        catch (BenchmarkFailure e) when (Output() is { Length: > 0 } output && !e.Message.Contains(output, StringComparison.Ordinal))
        {
            throw new BenchmarkFailure(e.Message + output);
        }
        finally
        {
            Prerequisites.EndAndDrain(process, Task.WhenAll(stdout, stderr));
        }
    }

    /// <summary>Runs a QMP step; its refusal becomes a failure naming the step and QEMU's message.</summary>
    private static void Step(string what, Action step)
    {
        try
        {
            step();
        }
        catch (BenchmarkFailure e)
        {
            throw new BenchmarkFailure($"{what}: {e.Message}");
        }
    }

    /// <summary>A 64-bit word of guest-physical memory through HMP's 'xp' (QMP human-monitor-command).</summary>
    private static ulong ReadPhysical(LineClient qmp, ulong gpa)
    {
        using var reply = qmp.Qmp("human-monitor-command", $"{{\"command-line\":\"xp /1gx 0x{gpa:x}\"}}");
        string text = reply.RootElement.GetProperty("return").GetString() ?? "";
        var m = XpWord().Match(text);
        if (!m.Success)
            throw new BenchmarkFailure($"HMP 'xp /1gx 0x{gpa:x}' said '{text.Trim()}'");
        return ulong.Parse(m.Groups[1].Value, NumberStyles.HexNumber, CultureInfo.InvariantCulture);
    }

    [GeneratedRegex(@":\s*0x([0-9a-fA-F]+)")]
    private static partial Regex XpWord();
}

using System.Collections.Concurrent;

namespace Kvm.Storage.Tests;

/// <summary>
/// Runs a test body on several threads at once: they start together (a barrier), each reports what
/// it found wrong to the shared queue, an exception on a thread is reported rather than lost, and
/// the test fails with every report once all threads have ended.
/// </summary>
internal static class ConcurrentThreads
{
    public static void Run(int threads, Action<int, ConcurrentQueue<string>> body)
    {
        using var start = new Barrier(threads);
        var errors = new ConcurrentQueue<string>();
        var workers = Enumerable.Range(0, threads).Select(t => new Thread(() =>
        {
            try
            {
                start.SignalAndWait();
                body(t, errors);
            }
            catch (Exception e)
            {
                errors.Enqueue($"thread {t}: {e}");
            }
        })).ToList();
        workers.ForEach(w => w.Start());
        workers.ForEach(w => w.Join());
        Assert.Empty(errors);
    }
}

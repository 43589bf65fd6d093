using MoeLora.Cli.Infrastructure;
using Spectre.Console.Cli;

namespace MoeLora.Cli.Tests;

/// <summary>Program.Run's promise: every failure is one line on stderr with a non-zero exit code.</summary>
[Collection("cli")] // swaps the static Consoles.Error
public class ProgramRunTests
{
    private sealed class Throwing(Exception e) : ICommandApp
    {
        public void Configure(Action<IConfigurator> configuration) { }
        public int Run(IEnumerable<string> args, CancellationToken cancellationToken = default) => throw e;
        public Task<int> RunAsync(IEnumerable<string> args, CancellationToken cancellationToken = default) => throw e;
    }

    private static (int Code, string Err) Run(Exception e)
    {
        var saved = Consoles.Error;
        var err = new StringWriter();
        Consoles.Error = err;
        try
        {
            return (Program.Run(new Throwing(e), []), err.ToString());
        }
        finally
        {
            Consoles.Error = saved;
        }
    }

    /// <summary>libtorch's CUDA out-of-memory error (a sentence, its allocator advice, then C++ frames) is one line.</summary>
    [Fact]
    public void Device_out_of_memory_is_exit_1_and_one_line()
    {
        var e = new System.Runtime.InteropServices.ExternalException(
            "CUDA out of memory. Tried to allocate 20.00 MiB. GPU 0 has a total capacity of 79.18 GiB of which 12.19 MiB is free. " +
            "If reserved but unallocated memory is large try setting PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True\n" +
            "Exception raised from malloc at CUDACachingAllocator.cpp:1574 (most recent call first):\nframe #0: c10::Error::Error");
        var (code, err) = Run(e);
        Assert.Equal(ExitCodes.Error, code);
        Assert.Single(err.Trim().Split('\n'));
        Assert.StartsWith("moelora: error: out of device memory: CUDA out of memory. Tried to allocate 20.00 MiB.", err);
        Assert.DoesNotContain("frame #0", err);
        Assert.DoesNotContain("If reserved", err);
    }

    [Fact]
    public void Bad_input_is_exit_1_and_one_line()
    {
        var (code, err) = Run(new MoeLora.Core.UserInputException("line one\nline two"));
        Assert.Equal(ExitCodes.Error, code);
        Assert.Equal("moelora: error: line one line two", err.Trim());
    }

    [Fact]
    public void A_malformed_command_line_is_exit_2() =>
        Assert.Equal(ExitCodes.Usage, Run(new UsageException("--threads 0: must be at least 1")).Code);

    [Theory]
    [InlineData(typeof(ArgumentException))]
    [InlineData(typeof(InvalidOperationException))]
    [InlineData(typeof(FormatException))]
    public void A_framework_exception_is_a_bug_not_bad_input(Type type)
    {
        // "injected adapter differs from the plan" is an InvalidOperationException: MoeLora's bug, not the user's.
        var (code, err) = Run((Exception)Activator.CreateInstance(type, "injected adapter differs from the plan")!);
        Assert.Equal(ExitCodes.Internal, code);
        Assert.StartsWith($"moelora: internal error: {type.Name}: injected adapter differs from the plan", err);
        Assert.Contains("MOELORA_DEBUG=1", err);
    }

    [Fact]
    public void A_bug_is_exit_70_and_one_line_without_stack_trace()
    {
        var (code, err) = Run(new NullReferenceException("boom"));
        Assert.Equal(ExitCodes.Internal, code);
        Assert.Single(err.Trim().Split('\n'));
        Assert.StartsWith("moelora: internal error: NullReferenceException: boom", err);
        Assert.DoesNotContain("   at ", err);
    }
}

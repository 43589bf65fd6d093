using MoeLora.Torch.Training;

namespace MoeLora.Cli.Tests;

/// <summary>A checkpoint or adapter write that fails (a full disk) names the run's folder, not the temporary one.</summary>
public sealed class CheckpointWriteFailureTests
{
    [Fact]
    public void A_failed_write_names_the_target_folder_and_leaves_no_temporary_folder()
    {
        var run = Directory.CreateTempSubdirectory("moelora-diskfull-").FullName;
        try
        {
            var target = Path.Combine(run, "checkpoint");
            var tmp = target + ".tmp-1234";
            var e = Assert.Throws<IOException>(() => Checkpoints.InTemporaryFolder(tmp, target, () =>
            {
                File.WriteAllText(Path.Combine(tmp, "adapter_config.json"), "{}");
                throw new IOException($"No space left on device : '{Path.Combine(tmp, "trainer_state.safetensors")}'");
            }));
            Assert.Equal($"cannot write {target}: No space left on device : '{Path.Combine(target, "trainer_state.safetensors")}'", e.Message);
            Assert.DoesNotContain(".tmp-", e.Message);
            Assert.False(Directory.Exists(tmp));
        }
        finally { Directory.Delete(run, true); }
    }
}

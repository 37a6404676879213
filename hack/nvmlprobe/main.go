// Command nvmlprobe is a read-only check of the agent's NVML boundary on
// real hardware: it lists the MIG-capable GPUs as the agent sees them,
// resolves each to a catalog model, and, where MIG is on, the profiles
// NVML offers. It changes nothing.
package main

import (
	"fmt"
	"os"

	"github.com/dynamig/dynamig/node-agent/gpu"
	"github.com/dynamig/dynamig/pkg/mig"
)

func main() {
	lib, err := gpu.OpenLibrary("")
	if err != nil {
		fmt.Println("open:", err)
		os.Exit(1)
	}
	defer lib.Close()
	gpus, err := lib.GPUs()
	if err != nil {
		fmt.Println("GPUs:", err)
		os.Exit(1)
	}
	fmt.Printf("%d MIG-capable GPUs\n", len(gpus))
	for _, g := range gpus {
		m, rerr := mig.ResolveModel(g.Name, g.PCIDeviceID, nil)
		name := "(none)"
		if m != nil {
			name = m.Name
		}
		fmt.Printf("gpu %d uuid=%s name=%q pci=%#x memMiB=%d mig=%+v model=%s resolveErr=%v\n", g.Index, g.UUID, g.Name, g.PCIDeviceID, g.MemoryMiB, g.MIG, name, rerr)
		ps, err := lib.Profiles(g.Index)
		fmt.Printf("  profiles err=%v\n", err)
		for _, p := range ps {
			fmt.Printf("  %s memSlices=%d max=%d starts=%v memMiB=%d\n", p.Name, p.MemorySlices, p.MaxCount, p.Starts, p.MemoryMiB)
		}
		ss, err := lib.Slices(g.Index)
		fmt.Printf("  slices=%d err=%v\n", len(ss), err)
	}
}

//! Changing the backing file an image's header names (`qblk rebase`).

use qblk_qcow2::header::{HeaderExtension, ext_type};

use crate::error::{Error, Result};
use crate::image::Image;

impl Image {
    pub(super) async fn set_backing_file_inner(
        &self,
        name: Option<&str>,
        format: Option<&str>,
    ) -> Result<()> {
        let w = self.check_writable(0, 0)?;
        if format.is_some() && name.is_none() {
            return Err(Error::Unsupported {
                path: self.path().to_owned(),
                what: "a backing format needs a backing file".into(),
            });
        }
        let mut synced = w.commit.lock().await;
        // Whatever was written before (a rebase's copied data) is durable
        // before the header names another backing file.
        w.writeback_locked(self, &mut synced, false).await?;
        {
            let mut a = w.lock_alloc();
            let mut header = a.header.clone();
            header.backing_file = name.map(str::to_owned);
            header.set_extension(
                ext_type::BACKING_FORMAT,
                format.map(|f| HeaderExtension::BackingFormat(f.to_owned())),
            );
            // Refused here, before anything is written, if the name does
            // not fit in the header cluster.
            header.encode().map_err(Error::format(self.path()))?;
            a.header = header;
        }
        // The header switch: durable, after everything above.
        w.writeback_locked(self, &mut synced, false).await
    }
}
